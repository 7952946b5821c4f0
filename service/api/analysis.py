"""Per-request face analysis for the routes: the pipeline's analysis path, off the event loop.

The routes analyse images only through :meth:`Pipeline.locate` and
:meth:`Pipeline.embed_faces` (:mod:`service.pipeline.faces` says which faces are kept).
Decoding, detection and alignment run in worker threads, at most
``settings.pipeline_threads`` images at a time (``AppState.cpu_limiter``; by default the
thread pool's own bound); embedding runs through the pipeline's embedder, which in the
app is the :class:`~service.batching.MicroBatcher`, so concurrent requests' faces share
one model call without any route knowing.  Stage times are collected per request
(reported with ``?timings=true``) and fed to the stage histograms.
"""

from __future__ import annotations

import time
from functools import partial

import anyio.to_thread
from starlette.concurrency import run_in_threadpool

from service.gallery.service import check_model
from service.pipeline.errors import PipelineError
from service.pipeline.faces import Faces, Policy
from service.pipeline.types import Timings

from .deps import AppState


async def locate(
    state: AppState,
    data: bytes,
    policy: Policy,
    timings: Timings,
    *,
    allow_none: bool = False,
    limit: int | None = None,
) -> Faces:
    """Find and align the faces of one image under ``policy``, without embedding them."""
    found = await anyio.to_thread.run_sync(
        partial(state.pipeline.locate, data, policy, timings, allow_none=allow_none, limit=limit),
        limiter=state.cpu_limiter,
    )
    state.metrics.faces_per_image.observe(found.detected)
    return found


async def embed(state: AppState, found: list[Faces], timings: Timings) -> None:
    """Embed the kept faces of ``found`` (one embedder call for them all)."""
    if any(len(f.detections) for f in found):
        await anyio.to_thread.run_sync(state.pipeline.embed_faces, found, timings)
    else:
        state.pipeline.embed_faces(found, timings)  # nothing to embed: no model call


async def analyze(
    state: AppState,
    data: bytes,
    policy: Policy,
    timings: Timings,
    *,
    allow_none: bool = False,
    limit: int | None = None,
) -> Faces:
    """Find the faces of one image under ``policy`` and embed them."""
    found = await locate(state, data, policy, timings, allow_none=allow_none, limit=limit)
    await embed(state, [found], timings)
    return found


async def analyze_labelled(
    state: AppState, images: dict[str, bytes], policy: Policy, timings: Timings
) -> list[Faces]:
    """The faces of several images, one after another in one worker thread (batched
    detection), then embedded in one call; a refusal names its image's field."""
    fields = list(images)
    results = await anyio.to_thread.run_sync(
        partial(state.pipeline.locate_batch, [images[f] for f in fields], policy, timings),
        limiter=state.cpu_limiter,
    )
    found = []
    for field, result in zip(fields, results, strict=True):
        if isinstance(result, PipelineError):
            raise type(result)(f"{field}: {result}") from None
        state.metrics.faces_per_image.observe(result.detected)
        found.append(result)
    await embed(state, found, timings)
    return found


async def call(timings: Timings, stage: str, fn, *args):
    """Run a blocking call (gallery work) in the thread pool, timing it as ``stage``."""
    start = time.perf_counter()
    try:
        return await run_in_threadpool(fn, *args)
    finally:
        timings.add(stage, time.perf_counter() - start)


async def gallery_for_model(state: AppState, name: str, timings: Timings) -> dict:
    """The gallery's info; 404 if unknown, 409 if it holds another model's embeddings."""
    info = await call(timings, "search", state.gallery.get_gallery, name)
    if info.get("model_id") is not None:
        check_model(name, info["model_id"], state.model_id)
    return info


def timings_ms(timings: Timings) -> dict[str, float]:
    """Milliseconds per stage for the whole request (summed over its images) and ``total``,
    the request from its first byte read to now; the stages run one after another, so
    they add up to at most ``total``."""
    body = {stage: round(seconds * 1000.0, 3) for stage, seconds in timings.stages.items()}
    body["total"] = round(timings.elapsed() * 1000.0, 3)
    return body
