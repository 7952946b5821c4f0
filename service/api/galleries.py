"""Galleries, subjects and enrolled faces: ``/v1/galleries/...``.

A gallery holds subjects (client-chosen ``subject_id`` plus JSON metadata); each
subject holds one or more enrolled faces (embeddings of the gallery's model).
Matching a subject uses its **best** face (max fusion).  Every write is durable
before it is acknowledged and visible to searches on this replica at once.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict

from service.gallery.names import GalleryNameStr, SubjectIdStr
from service.pipeline.types import Timings
from service.usecases import galleries as usecases

from . import analysis
from .audit import DeleteFaceAudit, DeleteGalleryAudit, DeleteSubjectAudit, EnrolAudit, ReenrolAudit
from .deps import State, require_api_key
from .images import read_payload
from .openapi import ERROR_RESPONSES, image_body
from .schemas import (
    GALLERY_PATTERN,
    NAME_PATTERN,
    EnrolledFace,
    Gallery,
    GalleryList,
    ReenrolReport,
    ReenrolRequest,
    Subject,
    SubjectCreate,
    SubjectDeleted,
    SubjectPage,
    SubjectUpdate,
)
from .scopes import allow_gallery, may_touch, require_scope

router = APIRouter(
    prefix="/v1/galleries",
    tags=["galleries"],
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
)

GalleryName = Annotated[GalleryNameStr, Path(pattern=GALLERY_PATTERN, description="gallery name")]
SubjectId = Annotated[
    SubjectIdStr, Path(pattern=NAME_PATTERN, description="client-chosen subject id")
]


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


async def _call(fn, *args):
    return await analysis.call(Timings(), "gallery", fn, *args)


@router.get(
    "",
    response_model=GalleryList,
    summary="List galleries",
    dependencies=[require_scope("identify")],
)
async def list_galleries(request: Request, state: State) -> dict:
    """The galleries the caller's API key may touch."""
    galleries = await _call(state.gallery.list_galleries)
    return {"galleries": [g.to_dict() for g in galleries if may_touch(request, g.name)]}


@router.put(
    "/{gallery}",
    response_model=Gallery,
    summary="Create a gallery for the served model",
    dependencies=[require_scope("enrol")],
)
async def create_gallery(gallery: GalleryName, response: Response, state: State) -> dict:
    """Idempotent; 409 ``model_mismatch`` if the gallery exists for another model."""
    made = await usecases.create_gallery(
        work=analysis.worker(state), gallery=state.gallery, name=gallery, timings=Timings()
    )
    response.status_code = status.HTTP_201_CREATED if made.created else status.HTTP_200_OK
    return made.record.to_dict()


@router.get(
    "/{gallery}",
    response_model=Gallery,
    summary="A gallery's model and sizes",
    dependencies=[require_scope("identify")],
)
async def get_gallery(gallery: GalleryName, state: State) -> dict:
    return (await _call(state.gallery.get_gallery, gallery)).to_dict()


@router.delete(
    "/{gallery}",
    summary="Delete a gallery with all its subjects and faces",
    dependencies=[require_scope("delete")],
)
async def delete_gallery(gallery: GalleryName, state: State, _audit: DeleteGalleryAudit) -> dict:
    await _call(state.gallery.delete_gallery, gallery)
    return {"deleted": gallery}


@router.post(
    "/{gallery}/subjects",
    response_model=Subject,
    status_code=201,
    summary="Create a subject (idempotent: 201 created, 200 already there)",
    dependencies=[require_scope("enrol")],
)
async def create_subject(
    gallery: GalleryName, body: SubjectCreate, response: Response, state: State
) -> dict:
    """Creates the gallery on first use (for the served model).  Posting an existing
    ``subject_id`` again returns it unchanged with 200 (its metadata is only changed
    by ``PATCH``)."""
    made = await usecases.create_subject(
        work=analysis.worker(state),
        gallery=state.gallery,
        name=gallery,
        subject_id=body.subject_id,
        metadata=body.metadata,
        timings=Timings(),
    )
    if not made.created:
        response.status_code = status.HTTP_200_OK
    return made.record.to_dict()


@router.get(
    "/{gallery}/subjects",
    response_model=SubjectPage,
    summary="List subjects (paginated)",
    dependencies=[require_scope("identify")],
)
async def list_subjects(
    gallery: GalleryName,
    state: State,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> dict:
    """Subjects ordered by ``subject_id``; pass ``next_cursor`` as ``cursor`` for the next page."""
    subjects, next_cursor = await _call(state.gallery.list_subjects, gallery, limit, cursor)
    return {"subjects": [s.to_dict() for s in subjects], "next_cursor": next_cursor}


@router.get(
    "/{gallery}/subjects/{subject_id}",
    response_model=Subject,
    summary="A subject with its metadata and enrolled faces",
    dependencies=[require_scope("identify")],
)
async def get_subject(gallery: GalleryName, subject_id: SubjectId, state: State) -> dict:
    return (await _call(state.gallery.get_subject, gallery, subject_id)).to_dict()


@router.patch(
    "/{gallery}/subjects/{subject_id}",
    response_model=Subject,
    summary="Update a subject's metadata (merge; null removes a key)",
    dependencies=[require_scope("enrol")],
)
async def update_subject(
    gallery: GalleryName, subject_id: SubjectId, body: SubjectUpdate, state: State
) -> dict:
    return (await _call(state.gallery.update_subject, gallery, subject_id, body.metadata)).to_dict()


@router.delete(
    "/{gallery}/subjects/{subject_id}",
    response_model=SubjectDeleted,
    summary="Delete a subject and all its faces",
    dependencies=[require_scope("delete")],
)
async def delete_subject(
    gallery: GalleryName, subject_id: SubjectId, state: State, _audit: DeleteSubjectAudit
) -> dict:
    removed = await _call(state.gallery.delete_subject, gallery, subject_id)
    return {"gallery": gallery, "subject_id": subject_id, "faces_removed": int(removed)}


@router.post(
    "/{gallery}/subjects/{subject_id}/faces",
    response_model=EnrolledFace,
    status_code=201,
    openapi_extra=image_body(("image",)),
    summary="Enrol one photo of a subject",
    dependencies=[require_scope("enrol")],
)
async def enrol_face(
    gallery: GalleryName, subject_id: SubjectId, request: Request, state: State, _audit: EnrolAudit
) -> dict:
    """The photo must show exactly one face of at least ``enroll_min_face_size`` px with a
    detection score of at least ``enroll_min_det_score``, and pass the enabled quality rules
    (``enroll_min_sharpness``, ``enroll_max_yaw_ratio``, ``enroll_max_roll_deg``); otherwise
    422 with code ``multiple_faces``, ``face_too_small``, ``low_quality_face``,
    ``blurred_face``, ``face_turned`` or ``face_tilted``.  The response gives
    the store-assigned ``face_id`` and the face's quality figures."""
    clock = Timings()
    payload = await read_payload(
        request, ("image",), ("image",), state.settings.max_image_bytes, timings=clock
    )
    payload.options(_NoOptions)
    face = await usecases.enrol_face(
        work=analysis.worker(state),
        gallery=state.gallery,
        settings=state.settings,
        name=gallery,
        subject_id=subject_id,
        image=payload.images["image"],
        timings=clock,
    )
    state.metrics.observe_stages(request.scope, clock.stages)
    return {
        **face.record.to_dict(),
        "gallery": face.gallery,
        "subject_id": face.subject_id,
        "model": face.model,
        "quality": face.quality,
        "face": face.detection.to_dict(),
    }


@router.post(
    "/{gallery}/reenrol",
    response_model=ReenrolReport,
    summary="Re-enrol another gallery's subjects with the served models",
    dependencies=[require_scope("enrol")],
)
async def reenrol(
    gallery: GalleryName, body: ReenrolRequest, request: Request, state: State, _audit: ReenrolAudit
) -> dict:
    """After a model upgrade: creates ``{gallery}`` for the served model if needed, copies
    every subject of ``source`` (same ``subject_id`` and metadata) and enrols every
    stored photo of ``source`` again, under the same quality rules as an upload.  Photos
    the current models refuse are skipped and listed in ``skipped``; faces without a stored
    photo are counted in ``faces_without_image``.  Idempotent: faces re-enrolled by an
    earlier call are not added again.  404 unknown ``source``; 409 ``conflict`` when
    ``source`` is ``{gallery}``, ``model_mismatch`` when ``{gallery}`` holds another model,
    ``no_stored_images`` when ``source`` kept no photos (``FACEGATE_STORE_IMAGES``)."""
    report = await usecases.reenrol(
        work=analysis.worker(state),
        gallery=state.gallery,
        settings=state.settings,
        source=body.source,
        target=gallery,
        timings=Timings(),
        allow_gallery=partial(allow_gallery, request),
    )
    return report.to_dict()


@router.delete(
    "/{gallery}/faces/{face_id}",
    summary="Delete one enrolled face",
    dependencies=[require_scope("delete")],
)
async def delete_face(
    gallery: GalleryName, face_id: Annotated[int, Path(ge=1)], state: State, _audit: DeleteFaceAudit
) -> dict:
    await _call(state.gallery.delete_face, gallery, face_id)
    return {"gallery": gallery, "face_id": face_id, "deleted": True}
