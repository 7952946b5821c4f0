"""Per-request face analysis for the routes: the use cases' :class:`Worker`, off the event loop.

The routes analyse images only through :mod:`service.usecases` and the
:class:`~service.usecases.work.Worker` built here from the app's state: decoding,
detection and alignment run in worker threads, at most ``settings.pipeline_threads``
images at a time (``AppState.cpu_limiter``; by default the thread pool's own bound);
embedding runs through the pipeline's embedder, which in the app is the
:class:`~service.batching.MicroBatcher`, so concurrent requests' faces share one model
call without any route knowing.  Stage times are collected per request (reported with
``?timings=true``) and fed to the stage histograms.
"""

from __future__ import annotations

from service.pipeline.faces import Faces, Policy
from service.pipeline.types import Timings
from service.records import GalleryRecord
from service.usecases.checks import gallery_for_model as _gallery_for_model
from service.usecases.work import Worker

from .deps import AppState


def worker(state: AppState) -> Worker:
    """The app's pipeline, run in worker threads under the app's CPU limiter."""
    return Worker(
        state.pipeline,
        threads=True,
        limiter=state.cpu_limiter,
        on_faces=state.metrics.faces_per_image.observe,
    )


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
    return await worker(state).locate(data, policy, timings, allow_none=allow_none, limit=limit)


async def embed(state: AppState, found: list[Faces], timings: Timings) -> None:
    """Embed the kept faces of ``found`` (one embedder call for them all)."""
    await worker(state).embed(found, timings)


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
    return await worker(state).analyze(data, policy, timings, allow_none=allow_none, limit=limit)


async def analyze_labelled(
    state: AppState, images: dict[str, bytes], policy: Policy, timings: Timings
) -> list[Faces]:
    """The faces of several images, one after another in one worker thread (batched
    detection), then embedded in one call; a refusal names its image's field."""
    return await worker(state).analyze_labelled(images, policy, timings)


async def call(timings: Timings, stage: str, fn, *args):
    """Run a blocking call (gallery work) in the thread pool, timing it as ``stage``."""
    return await Worker.call_in_pool(timings, stage, fn, *args)


async def gallery_for_model(state: AppState, name: str, timings: Timings) -> GalleryRecord:
    """The gallery's info; 404 if unknown, 409 if it holds another model's embeddings."""
    return await _gallery_for_model(
        work=worker(state), gallery=state.gallery, name=name, timings=timings
    )


def timings_ms(timings: Timings) -> dict[str, float]:
    """Milliseconds per stage for the whole request (summed over its images) and ``total``,
    the request from its first byte read to now; the stages run one after another, so
    they add up to at most ``total``."""
    body = {stage: round(seconds * 1000.0, 3) for stage, seconds in timings.stages.items()}
    body["total"] = round(timings.elapsed() * 1000.0, 3)
    return body
