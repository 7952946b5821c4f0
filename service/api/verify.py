"""``POST /v1/verify``: are two faces the same person (1:1)?"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

from fastapi import APIRouter, Depends, Request

from service.pipeline.types import Timings
from service.usecases.verify import VerifyResult
from service.usecases.verify import verify as verify_faces

from . import analysis
from .audit import VerifyAudit
from .deps import State, require_api_key
from .images import read_payload
from .openapi import ERROR_RESPONSES, image_body
from .schemas import Face, SubjectRef, VerifyOptions, VerifyResponse
from .scopes import allow_gallery, require_scope

router = APIRouter(prefix="/v1", tags=["verify"], dependencies=[Depends(require_api_key)])


@router.post(
    "/verify",
    response_model=VerifyResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=image_body(("image1", "image2"), VerifyOptions),
    summary="Compare two faces, or a face with an enrolled subject",
    dependencies=[require_scope("verify")],
)
async def verify(request: Request, state: State, entry: VerifyAudit, timings: bool = False) -> dict:
    """Compare the face in ``image1`` with the face in ``image2``, or with the enrolled
    subject ``gallery``/``subject_id``.

    A subject with several enrolled faces is compared by its **best** face (max
    fusion: the highest cosine over the subject's faces).  With several faces in an
    image the largest is used, or the request is refused with ``multiple_faces=refuse``.
    Instead of ``image1``: ``embedding`` (base64 float32) with ``model`` (the served model's
    id); the answer then has no ``face1``.
    The decision uses the recognition model card's threshold at ``operating_point``
    (default: the card's / the service's default); ``match`` is ``similarity >= threshold``.
    """
    clock = Timings()
    payload = await read_payload(
        request, ("image1", "image2"), (), state.settings.max_image_bytes, timings=clock
    )
    opts = payload.options(VerifyOptions)
    result = await verify_faces(
        work=analysis.worker(state),
        gallery=state.gallery,
        timings=clock,
        image1=payload.images.get("image1"),
        image2=payload.images.get("image2"),
        embedding=opts.embedding,
        model=opts.model,
        gallery_name=opts.gallery,
        subject_id=opts.subject_id,
        requested_point=opts.operating_point,
        configured_point=state.settings.operating_point,
        policy=opts.multiple_faces,
        allow_gallery=partial(allow_gallery, request),
        audit=entry,
    )
    state.metrics.observe_stages(request.scope, clock.stages)
    return _answer(result, analysis.timings_ms(clock) if timings else None)


def _answer(result: VerifyResult, timings: dict[str, float] | None) -> dict:
    decision, subject = result.decision, result.subject
    return VerifyResponse(
        match=decision.match,
        similarity=round(decision.similarity, 6),
        threshold=decision.threshold,
        calibrated=decision.calibrated,
        operating_point=result.operating_point,
        model=result.model,
        face1=Face(**result.face1.to_dict()) if result.face1 else None,
        face2=Face(**result.face2.to_dict()) if result.face2 else None,
        subject=SubjectRef(**asdict(subject)) if subject else None,
        timings=timings,
    ).model_dump(exclude_none=True)
