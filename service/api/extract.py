"""``POST /v1/detect`` and ``POST /v1/embed``: the faces of an image, with their embeddings.

The building blocks of the other endpoints, for clients that keep their own index
(InsightFace-REST's ``/extract``): every face's box, score, landmarks and the quality
figures enrolment computes, and, from ``/v1/embed``, its L2-normalised embedding from the
same micro-batched recognizer that ``/v1/verify`` and ``/v1/identify`` use (so the dot
product of two returned vectors is the similarity ``/v1/verify`` reports).  An image
without a face is no error here: the answer is 200 with ``faces: []``.
"""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends, Request

from service.pipeline.types import Timings
from service.usecases.extract import Extraction, extract_faces

from . import analysis
from .deps import AppState, State, require_api_key
from .images import read_payload
from .openapi import ERROR_RESPONSES, image_body
from .schemas import DetectOptions, DetectResponse, EmbedOptions, EmbedResponse
from .scopes import require_scope

router = APIRouter(prefix="/v1", tags=["extract"], dependencies=[Depends(require_api_key)])


def encode_embedding(vector: np.ndarray | None, fmt: str) -> list[float] | str:
    """``float``: a list of the float32 values; ``base64``: little-endian float32 bytes."""
    vector = np.asarray(vector, dtype="<f4")
    if fmt == "base64":
        return base64.b64encode(vector.tobytes()).decode("ascii")
    return vector.tolist()


async def _extract(
    request: Request, state: AppState, clock: Timings, options, embed: bool
) -> tuple[DetectOptions, Extraction, dict]:
    payload = await read_payload(
        request, ("image",), ("image",), state.settings.max_image_bytes, timings=clock
    )
    opts = payload.options(options)
    found = await extract_faces(
        work=analysis.worker(state),
        image=payload.images["image"],
        timings=clock,
        policy=opts.multiple_faces,
        limit=opts.max_faces,
        embed=embed,
    )
    state.metrics.observe_stages(request.scope, clock.stages)
    return opts, found, {"width": found.width, "height": found.height}


@router.post(
    "/detect",
    response_model=DetectResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=image_body(("image",), DetectOptions),
    summary="Find every face of an image: box, score, landmarks, quality",
    dependencies=[require_scope("verify")],
)
async def detect(request: Request, state: State, timings: bool = False) -> dict:
    """Every face of ``image``, largest first (at most ``max_faces``): box, detection score,
    five landmarks and the quality figures enrolment checks (size, sharpness, roll, yaw).
    No face: 200 with an empty ``faces`` list.  ``multiple_faces=refuse`` answers 422 when
    there are several faces."""
    clock = Timings()
    _, found, image = await _extract(request, state, clock, DetectOptions, embed=False)
    faces = [face.to_dict() for face in found.faces]
    body = {"image": image, "model": state.pipeline.detector_card.id, "faces": faces}
    if timings:
        body["timings"] = analysis.timings_ms(clock)
    return body


@router.post(
    "/embed",
    response_model=EmbedResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=image_body(("image",), EmbedOptions),
    summary="Every face of an image with its embedding",
    dependencies=[require_scope("verify")],
)
async def embed(request: Request, state: State, timings: bool = False) -> dict:
    """As ``/v1/detect``, plus each face's L2-normalised ``embedding`` (cosine similarity =
    dot product), as numbers or, with ``embedding_format=base64``, as the base64 of the
    little-endian float32 vector.  ``model`` is the recognizer's id as in ``/v1/verify``."""
    clock = Timings()
    opts, found, image = await _extract(request, state, clock, EmbedOptions, embed=True)
    fmt = opts.embedding_format  # type: ignore[attr-defined]
    faces = [
        {**face.to_dict(), "embedding": encode_embedding(face.embedding, fmt)}
        for face in found.faces
    ]
    body = {
        "image": image,
        "model": state.model_id,
        "model_sha256": state.pipeline.recognizer_card.sha256,
        "detector": state.pipeline.detector_card.id,
        "embedding_dim": state.pipeline.dim,
        "embedding_format": fmt,
        "faces": faces,
    }
    if timings:
        body["timings"] = analysis.timings_ms(clock)
    return body
