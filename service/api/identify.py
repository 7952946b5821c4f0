"""``POST /v1/identify``: who is this (1:N, open-set)?"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, Depends, Request

from service.pipeline.decision import Threshold, decide, operating_point, threshold_for
from service.pipeline.types import Detection, Timings

from . import analysis
from .audit import IdentifyAudit
from .deps import State, require_api_key
from .errors import ApiError
from .images import read_payload
from .openapi import ERROR_RESPONSES, image_body
from .probes import probe_analysis
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
    if opts.top_k > settings.top_k_max:
        raise ApiError(
            422, "validation_error", f"top_k: must be between 1 and {settings.top_k_max}"
        )
    if opts.threshold is not None and opts.operating_point is not None:
        raise ApiError(400, "ambiguous_request", "give threshold or operating_point, not both")
    card = state.pipeline.recognizer_card
    if opts.threshold is not None:
        rule = Threshold.custom(opts.threshold)
    else:
        rule = threshold_for(
            card, operating_point(card, opts.operating_point, settings.operating_point)
        )
    model_id = state.model_id
    gallery = state.gallery
    # Unknown gallery or another model's gallery: refused before any image work.
    await analysis.gallery_for_model(state, opts.gallery, clock)

    if opts.embedding is not None:
        if "image" in payload.images:
            raise ApiError(400, "ambiguous_request", "give image or embedding, not both")
        found = probe_analysis(state, opts.embedding, opts.model)
    elif "image" in payload.images:
        found = await analysis.analyze(state, payload.images["image"], "all", clock)
    else:
        raise ApiError(422, "missing_field", "missing image field(s): image (or embedding)")
    detections: Sequence[Detection | None] = found.detections or [None] * len(found.embeddings)
    results = await analysis.call(
        clock, "search", gallery.search, opts.gallery, found.embeddings, opts.top_k, model_id
    )
    faces = []
    for detection, candidates in zip(detections, results, strict=True):
        best = candidates[0] if candidates else None
        match = None
        if best is not None and decide(best["similarity"], rule).match:
            match = best["subject_id"]
        entry.add([c["subject_id"] for c in candidates], [c.get("face_id") for c in candidates])
        faces.append(
            {
                **(detection.to_dict() if detection is not None else {}),
                "candidates": [
                    {
                        "subject_id": c["subject_id"],
                        "similarity": round(float(c["similarity"]), 6),
                        "face_id": c.get("face_id"),
                    }
                    for c in candidates
                ],
                "match": match,
            }
        )
    state.metrics.observe_stages(request.scope, clock.stages)
    body = {
        "gallery": opts.gallery,
        "threshold": rule.value,
        "operating_point": rule.operating_point,
        "model": model_id,
        "faces": faces,
    }
    if timings:
        body["timings"] = analysis.timings_ms(clock)
    return body
