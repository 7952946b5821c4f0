"""Gallery use cases: create galleries and subjects, enrol a photo, delete, re-enrol.

The reads (a gallery, a subject, a page of subjects) are one gallery call each and the
routes make it themselves; what has a rule of its own lives here: which checks come
before any image work, what an enrolment stores, how a re-enrolment runs its chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.pipeline.faces import face_quality
from service.pipeline.quality import check_enrol_quality
from service.pipeline.types import Detection, Timings
from service.reenrol import Reenrolled, Reenrolment

from .checks import gallery_for_model
from .work import Worker

if TYPE_CHECKING:
    from service.config import Settings
    from service.gallery.service import GalleryService
    from service.records import FaceRecord, GalleryRecord, SubjectRecord


@dataclass(frozen=True)
class Created:
    """A gallery or subject as stored, and whether this call created it."""

    record: GalleryRecord | SubjectRecord
    created: bool


@dataclass(frozen=True)
class Enrolled:
    """One enrolled face: the store's record of it, the face found and its quality."""

    record: FaceRecord  # face_id, created_at, quality as stored
    gallery: str
    subject_id: str
    model: str
    detection: Detection
    quality: dict[str, Any]  # the stored quality figures, else those computed


async def create_gallery(
    *, work: Worker, gallery: GalleryService, name: str, timings: Timings
) -> Created:
    """Create ``name`` for the worker's model (idempotent; 409 for another model)."""
    existed = name in {
        g["name"] for g in await work.call(timings, "gallery", gallery.list_galleries)
    }
    info = await work.call(
        timings, "gallery", gallery.create_gallery, name, work.model_id, work.pipeline.dim
    )
    return Created(info, not existed)


async def create_subject(
    *,
    work: Worker,
    gallery: GalleryService,
    name: str,
    subject_id: str,
    metadata: dict[str, Any] | None,
    timings: Timings,
) -> Created:
    """Create a subject (and its gallery for the worker's model on first use); an existing
    subject is returned unchanged."""
    subject, created = await work.call(
        timings,
        "gallery",
        gallery.upsert_subject,
        name,
        subject_id,
        metadata,
        work.model_id,
        work.pipeline.dim,
    )
    return Created(subject, created)


async def enrol_face(
    *,
    work: Worker,
    gallery: GalleryService,
    settings: Settings,
    name: str,
    subject_id: str,
    image: bytes,
    timings: Timings,
) -> Enrolled:
    """Enrol one photo of a subject: the gallery must exist for this model and the subject
    must exist (checked before any image work); then exactly one face over the enrolment
    floor that passes the quality rules, embedded and stored (with the photo when
    ``settings.store_images``)."""
    await gallery_for_model(work=work, gallery=gallery, name=name, timings=timings)
    await work.call(timings, "gallery", gallery.get_subject, name, subject_id)
    found = await work.analyze(image, "enrol", timings)
    detection = found.detections[0]
    quality = face_quality(detection, found.crops[0])
    check_enrol_quality(quality, settings)
    face = await work.call(
        timings,
        "gallery",
        gallery.add_face,
        name,
        subject_id,
        found.embeddings[0],
        work.model_id,
        quality,
        image if settings.store_images else None,
    )
    return Enrolled(face, name, subject_id, work.model_id, detection, face.quality or quality)


async def reenrol(
    *,
    work: Worker,
    gallery: GalleryService,
    settings: Settings,
    source: str,
    target: str,
    timings: Timings,
    allow_gallery: Callable[[str], None] | None = None,
) -> Reenrolled:
    """Re-enrol gallery ``source`` into ``target`` with the worker's models
    (:class:`service.reenrol.Reenrolment`): the caller must be allowed ``source``; every
    check runs before anything is written; then one chunk of photos per blocking call,
    bounded like other image work."""
    if allow_gallery is not None:
        allow_gallery(source)
    job = Reenrolment(gallery, work.pipeline, settings, source, target)
    await work.call(timings, "gallery", job.prepare)
    while await work.run(job.step):
        pass
    return job.report.frozen()
