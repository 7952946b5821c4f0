"""``POST /v1/identify``: who is this (1:N, open-set)?"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.pipeline.types import Timings
from service.usecases.identify import IdentifiedFace, IdentifyResult
from service.usecases.identify import identify as identify_faces

from . import analysis
from .audit import IdentifyAudit
from .deps import State, require_api_key
from .images import read_payload
from .openapi import ERROR_RESPONSES, image_body
from .schemas import IdentifyOptions, IdentifyResponse
from .scopes import allow_gallery, require_scope

router = APIRouter(prefix="/v1", tags=["identify"], dependencies=[Depends(require_api_key)])


@router.post(
    "/identify",
    response_model=IdentifyResponse,
    response_model_exclude_unset=True,
    responses=ERROR_RESPONSES,
    openapi_extra=image_body(("image",), IdentifyOptions),
    summary="Search every face of an image in a gallery",
    dependencies=[require_scope("identify")],
)
async def identify(
    request: Request, state: State, entry: IdentifyAudit, timings: bool = False
) -> dict:
    """For every face in ``image`` (largest first): its ``top_k`` most similar subjects of
    ``gallery`` and ``match``, the best subject if its similarity reaches the threshold,
    else ``null`` (open-set: the person may not be enrolled).

    Instead of ``image``: ``embedding`` (base64 float32) with ``model`` (the served model's
    id) searches that one vector; its answer has no box.

    A subject's similarity is that of its **best** enrolled face (max fusion).  The
    threshold is ``threshold`` if given, else the card's threshold at ``operating_point``.
    """
    settings = state.settings
    clock = Timings()
    payload = await read_payload(request, ("image",), (), settings.max_image_bytes, timings=clock)
    opts = payload.options(IdentifyOptions)
    allow_gallery(request, opts.gallery)
    entry.gallery = opts.gallery
    result = await identify_faces(
        work=analysis.worker(state),
        gallery=state.gallery,
        timings=clock,
        gallery_name=opts.gallery,
        image=payload.images.get("image"),
        embedding=opts.embedding,
        model=opts.model,
        top_k=opts.top_k,
        top_k_max=settings.top_k_max,
        threshold=opts.threshold,
        requested_point=opts.operating_point,
        configured_point=settings.operating_point,
        audit=entry,
    )
    state.metrics.observe_stages(request.scope, clock.stages)
    body = _answer(result)
    if timings:
        body["timings"] = analysis.timings_ms(clock)
    return body


def _face(face: IdentifiedFace) -> dict:
    return {
        **(face.detection.to_dict() if face.detection is not None else {}),
        "candidates": [
            {"subject_id": c.subject_id, "similarity": round(c.similarity, 6), "face_id": c.face_id}
            for c in face.candidates
        ],
        "match": face.match,
    }


def _answer(result: IdentifyResult) -> dict:
    return {
        "gallery": result.gallery,
        "threshold": result.threshold.value,
        "operating_point": result.threshold.operating_point,
        "model": result.model,
        "faces": [_face(face) for face in result.faces],
    }
