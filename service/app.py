"""The FastAPI application factory and its lifespan.

``create_app(settings)`` builds a fresh app (its own metrics registry, no
globals); the lifespan loads and warms the models, opens and starts the gallery
and the embedding micro-batcher, and tears them down again.  ``facegate serve``
runs it with uvicorn in factory mode (``service.app:create_app``), so every
worker process builds its own app from the environment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import anyio.to_thread
import numpy as np
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service.api import (
    audit,
    bulk,
    errors,
    extract,
    galleries,
    health,
    identify,
    info,
    people,
    transfer,
    verify,
)
from service.api.admission import AdmissionMiddleware
from service.api.deps import AppState
from service.api.keys import build_keyring
from service.api.limits import BodyLimitMiddleware
from service.api.urls import UrlFetcher
from service.batching import MicroBatcher
from service.config import Settings, get_settings
from service.gallery import open_gallery
from service.gallery.audit import AuditWriter
from service.gallery.errors import GalleryError
from service.metrics import Metrics, MetricsMiddleware, watch_event_loop
from service.pipeline.errors import PipelineError
from service.pipeline.pipeline import Pipeline

log = logging.getLogger("facegate.app")

#: Where the Swagger UI / ReDoc assets are served from.
DOCS_ASSETS_URL = "/docs-assets"

DESCRIPTION = """Face verification (1:1) and identification (1:N) over ONNX models, plus
face detection and embedding extraction.

* Errors are always `{"error": {"code": "...", "message": "..."}}` with a fitting status.
* Scores are cosine similarities in [-1, 1]; thresholds come from the recognition model's
  card at a named operating point (false-match rate).
* A subject with several enrolled faces is matched by its best face (max fusion).
* Send `X-API-Key` when the service is configured with API keys (health is open; metrics
  need `FACEGATE_METRICS_KEY` when it is set). Keys are checked before a body is read.
"""


def _version() -> str:
    try:
        return version("facegate")
    except PackageNotFoundError:
        return "0.0.0"


def cpu_limiter(settings: Settings):
    """Bound on images analysed at once: ``settings.pipeline_threads``, or (0) just the
    thread pool's own bound (measured in BENCHMARKS.md)."""
    if settings.pipeline_threads > 0:
        return anyio.CapacityLimiter(settings.pipeline_threads)
    return anyio.to_thread.current_default_thread_limiter()


async def _start(state: AppState) -> None:
    settings = state.settings
    t0 = time.perf_counter()
    pipeline = await anyio.to_thread.run_sync(Pipeline.from_settings, settings)
    state.startup["models_s"] = round(time.perf_counter() - t0, 3)
    t1 = time.perf_counter()
    state.gallery = open_gallery(settings)  # set first: a failed start is still stopped
    await anyio.to_thread.run_sync(state.gallery.start)
    state.audit = AuditWriter(state.gallery.store, settings.audit_retention_days)
    state.startup["gallery_s"] = round(time.perf_counter() - t1, 3)

    metrics = state.metrics

    def observe(size: int, waits: list[float]) -> None:
        metrics.batch_size.observe(size)
        for wait in waits:
            metrics.batch_wait.observe(wait)

    state.cpu_limiter = cpu_limiter(settings)
    state.fetcher = UrlFetcher.from_settings(settings, user_agent=f"facegate/{_version()}")
    # The one embedder of the app: every embedding, whoever asks, goes through the batcher.
    assert pipeline.embedder is not None  # from_settings builds both models
    state.batcher = MicroBatcher(
        pipeline.embedder,
        enabled=settings.batching,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        observer=observe,
    )
    await state.batcher.start()
    state.pipeline = pipeline.with_embedder(state.batcher)
    # Warm the whole embedding path once (sessions were warmed when built).
    size = state.pipeline.crop_size
    await state.batcher.embed_async(np.zeros((1, size[1], size[0], 3), dtype=np.uint8))
    state.loop_watch = asyncio.create_task(watch_event_loop(metrics))
    state.warmed = True
    log.info(
        "facegate ready: detector %s, recognizer %s (%s), startup %s",
        state.pipeline.detector_card.name,
        state.pipeline.recognizer_card.name,
        state.pipeline.recognizer_selection,
        state.startup,
    )


async def _stop(state: AppState) -> None:
    state.warmed = False
    if state.loop_watch is not None:
        state.loop_watch.cancel()
    if state.batcher is not None:
        await state.batcher.stop()
    if state.fetcher is not None:
        await state.fetcher.aclose()
    if state.audit is not None:
        await anyio.to_thread.run_sync(state.audit.close)
    if state.gallery is not None:
        await anyio.to_thread.run_sync(state.gallery.stop)


@asynccontextmanager
async def lifespan(app: FastAPI):
    state = AppState(settings=app.state.settings, metrics=app.state.metrics)
    app.state.facegate = state
    try:
        await _start(state)
        yield
    finally:
        await _stop(state)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app for ``settings`` (default: from the ``FACEGATE_*`` environment)."""
    settings = settings or get_settings()
    metrics = Metrics()
    # Swagger UI and ReDoc from the assets of the installed ``fastapi-offline`` package
    # (FastAPI's own pages load them from a CDN: a blank page on an offline host).
    # No redirects: a 307 from ``/x/`` to ``/x`` would send a write to another resource.
    app = FastAPIOffline(
        title="facegate",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_ASSETS_URL,
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.keyring = build_keyring(settings.api_keys, settings.api_keys_file)
    app.state.metrics = metrics
    errors.install(app, domain_errors=(PipelineError, GalleryError))
    for module in (
        health,
        info,
        verify,
        identify,
        extract,
        galleries,
        bulk,
        transfer,
        audit,
        people,
    ):
        app.include_router(module.router)
    app.add_middleware(AdmissionMiddleware, settings=settings, metrics=metrics)  # inside the limit
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        metrics=metrics,
        body_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
