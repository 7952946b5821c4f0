"""``POST /v1/verify``: are two faces the same person (1:1)?"""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Depends, Request

from service.gallery.errors import SubjectNotFound
from service.pipeline.errors import PipelineError
from service.pipeline.types import Timings

from . import analysis
from .decisions import check_point, decide
from .deps import AppState, State, require_api_key
from .errors import ApiError, bad_request
from .images import read_payload
from .openapi import ERROR_RESPONSES, image_body
from .schemas import Face, SubjectRef, VerifyOptions, VerifyResponse

router = APIRouter(prefix="/v1", tags=["verify"], dependencies=[Depends(require_api_key)])


def _tag(exc: Exception, field: str) -> Exception:
    """The same pipeline error, its message naming the image field it concerns."""
    if isinstance(exc, PipelineError):
        return type(exc)(f"{field}: {exc}")
    return exc


async def _analyze_labelled(state: AppState, data: bytes, field: str, policy, timings: Timings):
    try:
        return await analysis.analyze(state, data, policy, timings)
    except PipelineError as exc:
        raise _tag(exc, field) from None


def _subject_best(gallery, name: str, subject_id: str, embedding: np.ndarray, model_id: str,
                  subjects: int) -> dict:
    """The subject's best face for ``embedding`` (max fusion), via the gallery's search.

    The search ranks every subject of the gallery by its best face, so asking for
    all subjects always includes this one (exact with the flat index).
    """
    ranked = gallery.search(name, embedding[None, :], subjects, model_id)[0]
    for candidate in ranked:
        if candidate["subject_id"] == subject_id:
            return candidate
    raise SubjectNotFound(f"subject {subject_id!r} has no face in gallery {name!r}'s index")


@router.post(
    "/verify",
    response_model=VerifyResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=image_body(("image1", "image2"), VerifyOptions),
    summary="Compare two faces, or a face with an enrolled subject",
)
async def verify(request: Request, state: State, timings: bool = False) -> dict:
    """Compare the face in ``image1`` with the face in ``image2``, or with the enrolled
    subject ``gallery``/``subject_id``.

    A subject with several enrolled faces is compared by its **best** face (max
    fusion: the highest cosine over the subject's faces).  With several faces in an
    image the largest is used, or the request is refused with ``multiple_faces=refuse``.
    The decision uses the recognition model card's threshold at ``operating_point``
    (default: the card's / the service's default); ``match`` is ``similarity >= threshold``.
    """
    settings = state.settings
    clock = Timings()
    payload = await read_payload(request, ("image1", "image2"), ("image1",),
                                 settings.max_image_bytes, timings=clock)
    opts = payload.options(VerifyOptions)
    card = state.pipeline.recognizer_card
    point = check_point(card, opts.operating_point, settings)
    model_id = state.model_id
    policy = opts.multiple_faces
    subject = None

    if "image2" in payload.images:
        if opts.gallery or opts.subject_id:
            raise bad_request("ambiguous_request",
                              "send either image2 or gallery + subject_id, not both")
        results = await asyncio.gather(
            _analyze_labelled(state, payload.images["image1"], "image1", policy, clock),
            _analyze_labelled(state, payload.images["image2"], "image2", policy, clock),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        first, second = results
        similarity = float(np.dot(first.embeddings[0], second.embeddings[0]))
        face2 = second.detections[0].to_dict()
    else:
        if not (opts.gallery and opts.subject_id):
            raise ApiError(422, "missing_field",
                           "send image2, or gallery and subject_id to compare with an enrolled "
                           "subject")
        gallery = state.gallery
        # Unknown gallery/subject or a gallery of another model: refused before any image work.
        info = await analysis.gallery_for_model(state, opts.gallery, clock)
        subject_info = await analysis.call(clock, "search", gallery.get_subject, opts.gallery,
                                           opts.subject_id)
        if not subject_info.get("faces"):
            raise ApiError(422, "no_enrolled_face",
                           f"subject {opts.subject_id!r} has no enrolled face to compare with")
        first = await _analyze_labelled(state, payload.images["image1"], "image1", policy, clock)
        best = await analysis.call(clock, "search", _subject_best, gallery, opts.gallery,
                                   opts.subject_id, first.embeddings[0], model_id,
                                   int(info.get("subjects") or 1))
        similarity = float(best["similarity"])
        subject = SubjectRef(gallery=opts.gallery, subject_id=opts.subject_id,
                             face_id=best.get("face_id"))
        face2 = None

    state.metrics.observe_stages(clock.stages)
    decision = decide(similarity, card, point)
    return VerifyResponse(
        match=decision.match,
        similarity=round(similarity, 6),
        threshold=decision.threshold,
        calibrated=decision.calibrated,
        operating_point=decision.operating_point,
        model=model_id,
        face1=Face(**first.detections[0].to_dict()),
        face2=Face(**face2) if face2 else None,
        subject=subject,
        timings=analysis.timings_ms(clock) if timings else None,
    ).model_dump(exclude_none=True)
