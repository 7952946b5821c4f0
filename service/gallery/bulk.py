"""Writing many faces at once through a :class:`GalleryService`: bulk enrolment and restore.

The record checks here (with :mod:`service.gallery.names` and
:func:`~service.gallery.service.check_vectors`) are the one set of rules for what a face or
subject written in bulk may hold, whoever writes it (``POST /v1/galleries/{g}/faces``,
``facegate gallery import``, ``facegate gallery restore``): :func:`write_many` runs every
record through :func:`check_subject` and :func:`check_face`, and the restore's reader
(:func:`service.gallery.transfer.read_export`) runs the same two on each line, so an export
file can never hold what the API would refuse.

:func:`write_many` checks every name and embedding first, then hands everything to
:meth:`GalleryStore.write_faces`, which commits it in **one** transaction with one
change-log entry per face (so replicas follow it like single enrolments), and
finally applies that log to this service's own indexes before returning.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
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


#: Clock skew allowed for a time in a written record (epoch seconds in the future).
FUTURE_SKEW_S = 86400.0


def check_time(value: object, what: str = "created_at") -> float:
    """Epoch seconds: a finite number from 0 up to a day from now (anything later is no
    real time and would not even print as a date)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{what} must be a number (epoch seconds)")
    number = float(value)
    if not math.isfinite(number) or not 0 <= number <= time.time() + FUTURE_SKEW_S:
        raise InvalidInput(f"{what} must be epoch seconds between 0 and now")
    return number


def check_photo(
    image: bytes | None, digest: str | None, max_bytes: int, what: str = "image"
) -> None:
    """A stored photo: within the upload limit, and the bytes its ``content_sha256`` names."""
    if image is None:
        return
    if len(image) > max_bytes:
        raise InvalidInput(f"{what} is larger than the image limit of {max_bytes} bytes")
    if digest is not None and hashlib.sha256(image).hexdigest() != digest:
        raise InvalidInput(f"{what} does not match its content_sha256")


def check_subject(subject: NewSubject) -> NewSubject:
    """A subject record as the REST API would accept it (id, metadata, time)."""
    check_subject_id(subject.subject_id)
    if subject.metadata is not None:
        check_metadata(subject.metadata)
    if subject.created_at is not None:
        check_time(subject.created_at)
    return subject


def check_face(face: NewFace, max_image_bytes: int, dim: int | None = None) -> NewFace:
    """A face record as the REST API would accept it (subject id, embedding, quality
    figures, photo and its sha256, time), its embedding as checked float32."""
    check_subject_id(face.subject_id)
    if face.content_sha256 is not None:
        check_sha256(face.content_sha256)
    vector = check_vectors(face.embedding, dim, batch=False)
    if face.quality is not None:
        check_metadata(face.quality, "quality")
    check_photo(face.image, face.content_sha256, max_image_bytes)
    if face.created_at is not None:
        check_time(face.created_at)
    return NewFace(
        face.subject_id, vector, face.quality, face.image, face.content_sha256, face.created_at
    )


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
    checked = checked_faces(gallery, name, model_id, subjects, faces)
    results, seq = gallery.store.write_faces(
        name, model_id, subjects, checked, new_gallery=new_gallery, only_with_faces=only_with_faces
    )
    gallery.sync_to(seq)
    return results


def checked_faces(
    gallery: GalleryService,
    name: str,
    model_id: str,
    subjects: list[NewSubject],
    faces: list[NewFace],
) -> list[NewFace]:
    """:func:`write_many`'s checks of its input; the faces to write (photos kept only when
    ``settings.store_images`` is set)."""
    check_gallery(name)
    check_name(model_id, "model_id")
    for subject in subjects:
        check_subject(subject)
    checked = []
    for face in faces:
        face = check_face(face, gallery.settings.max_image_bytes)
        image = face.image if gallery.settings.store_images else None
        checked.append(
            NewFace(
                face.subject_id,
                face.embedding,
                face.quality,
                image,
                face.content_sha256,
                face.created_at,
            )
        )
    return checked
