"""Bulk enrolment: many photos through the pipeline in batches, then one store transaction.

:func:`analyse_photos` runs photos as ``POST /v1/galleries/{g}/subjects/{id}/faces`` runs
one (decode, detect, exactly one face over the enrolment floor, align, the enrolment
quality rules), locating faces photo by photo (in several threads when asked) and embedding
every accepted face in **one** model call; re-enrolment (:mod:`service.reenrol`) uses it
too.  :func:`enrol_photos` adds the accepted faces to a gallery with
:func:`service.gallery.bulk.write_many` (one transaction; a photo already enrolled into
the gallery, by sha256 of its bytes, is not added twice).

Bulk enrolment itself, the request and ``facegate gallery import``, is the use case
:mod:`service.usecases.enrol_many`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.gallery.bulk import write_many
from service.gallery.store import NewFace, NewSubject
from service.pipeline.errors import PipelineError
from service.pipeline.faces import face_quality
from service.pipeline.quality import check_enrol_quality
from service.pipeline.types import Detection

if TYPE_CHECKING:
    from service.gallery.service import GalleryService

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
BATCH = 16


@dataclass
class Located:
    """One photo's enrolment face, aligned, before embedding."""

    detection: Detection
    crop: np.ndarray
    quality: dict


@dataclass
class Accepted:
    """One photo's face, ready to enrol."""

    embedding: np.ndarray
    quality: dict
    detection: Detection


def locate_photo(pipeline, settings, data: bytes) -> Located:
    """decode -> detect -> exactly one face over the enrolment floor -> align -> the
    enrolment quality rules; raises the ``PipelineError`` that refuses the photo."""
    found = pipeline.locate(data, "enrol")
    detection, crop = found.detections[0], found.crops[0]
    quality = face_quality(detection, crop)
    check_enrol_quality(quality, settings)
    return Located(detection, crop, quality)


def embed_located(pipeline, located: list[Located]) -> list[Accepted]:
    """Embed every located face in one model call."""
    if not located:
        return []
    embeddings = pipeline.embed(np.stack([face.crop for face in located]))
    return [
        Accepted(np.asarray(embedding, dtype=np.float32), face.quality, face.detection)
        for face, embedding in zip(located, embeddings, strict=True)
    ]


def _try_locate(pipeline, settings, data: bytes) -> Located | PipelineError:
    try:
        return locate_photo(pipeline, settings, data)
    except PipelineError as exc:
        return exc


def analyse_photos(
    pipeline, settings, photos: list[bytes], workers: int = 1
) -> list[Accepted | Exception]:
    """Per photo, its enrolment face or the error that refuses it (``PipelineError``).

    Photos are located in ``workers`` threads, one photo at a time each (on CPU the
    detector's batch call measured no faster than one image at a time, see BENCHMARKS.md),
    and every accepted face is embedded in one model call."""
    if workers > 1 and len(photos) > 1:
        with ThreadPoolExecutor(min(workers, len(photos))) as pool:
            found = list(pool.map(lambda data: _try_locate(pipeline, settings, data), photos))
    else:
        found = [_try_locate(pipeline, settings, data) for data in photos]
    return merge_embedded(
        found, embed_located(pipeline, [f for f in found if isinstance(f, Located)])
    )


def merge_embedded(found: list, accepted: list[Accepted]) -> list[Accepted | Exception]:
    """``found`` (``Located`` or an error per photo) with each ``Located`` replaced, in
    order, by its ``Accepted`` from :func:`embed_located`."""
    faces = iter(accepted)
    return [next(faces) if isinstance(item, Located) else item for item in found]


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def enrol_photos(
    gallery: GalleryService,
    name: str,
    model_id: str,
    items: Sequence[tuple[str, dict | None, bytes]],
    accepted: list[Accepted],
) -> list[dict]:
    """Add ``accepted[i]`` for ``items[i] = (subject_id, metadata, photo)`` in one transaction;
    subjects are created as needed (with ``metadata``; an existing subject is left as is),
    only for items that add a face.  Returns per item ``{face_id, subject_id, created}``, or
    with ``error: "photo_enrolled_elsewhere"`` for a photo another subject holds."""
    subjects: dict[str, NewSubject] = {}
    for subject_id, metadata, _ in items:
        subjects.setdefault(subject_id, NewSubject(subject_id, metadata))
    faces = [
        NewFace(subject_id, face.embedding, face.quality, data, content_sha256(data))
        for (subject_id, _, data), face in zip(items, accepted, strict=True)
    ]
    return write_many(gallery, name, model_id, list(subjects.values()), faces, only_with_faces=True)
