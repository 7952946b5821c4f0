"""Writing many faces at once through a :class:`GalleryService`: bulk enrolment and restore.

:func:`write_many` checks every name and embedding first, then hands everything to
:meth:`GalleryStore.write_faces`, which commits it in **one** transaction with one
change-log entry per face (so replicas follow it like single enrolments), and
finally applies that log to this service's own indexes before returning.
"""

from __future__ import annotations

import re
from typing import Any, cast

from service.gallery.errors import InvalidInput
from service.gallery.names import check_gallery, check_subject_id
from service.gallery.service import GalleryService, check_name, check_vectors
from service.gallery.sql import dump_json
from service.gallery.store import NewFace, NewSubject

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def check_sha256(value: object, what: str = "content_sha256") -> str:
    if not isinstance(value, str) or not SHA256_HEX.match(value):
        raise InvalidInput(f"{what} must be 64 lower-case hexadecimal digits")
    return value


def check_metadata(value: object, what: str = "metadata") -> dict[str, Any]:
    """A subject's metadata as the store will accept it (a JSON object within the size
    limit), checked before anything is written; ``InvalidInput`` otherwise."""
    dump_json(value, what)  # refuses anything but a JSON object
    return cast(dict[str, Any], value)


def write_many(
    gallery: GalleryService,
    name: str,
    model_id: str,
    subjects: list[NewSubject],
    faces: list[NewFace],
    *,
    new_gallery: bool = False,
    only_with_faces: bool = False,
) -> list[dict]:
    """Create ``subjects`` and add ``faces`` to gallery ``name`` in one transaction; return,
    per face, ``{face_id, subject_id, created}`` (``created=False``: the same photo,
    by ``content_sha256``, was enrolled before and that face is named instead).

    Photos are kept only when ``settings.store_images`` is set, as for single enrolments.
    """
    check_gallery(name)
    check_name(model_id, "model_id")
    for subject in subjects:
        check_subject_id(subject.subject_id)
    checked = []
    for face in faces:
        check_subject_id(face.subject_id)
        if face.content_sha256 is not None:
            check_sha256(face.content_sha256)
        vector = check_vectors(face.embedding, batch=False)
        image = face.image if gallery.settings.store_images else None
        checked.append(
            NewFace(
                face.subject_id, vector, face.quality, image, face.content_sha256, face.created_at
            )
        )
    results, seq = gallery.store.write_faces(
        name, model_id, subjects, checked, new_gallery=new_gallery, only_with_faces=only_with_faces
    )
    gallery.sync_to(seq)
    return results
