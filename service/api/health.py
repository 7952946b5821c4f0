"""Liveness, readiness and Prometheus metrics (open: no API key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: models loaded and warmed, gallery index ready")
async def readyz(request: Request) -> JSONResponse:
    """200 when the models are loaded and warmed and the gallery is ready, else 503.
    The body reports each check and the gallery's replication state (``sync``)."""
    state = getattr(request.app.state, "facegate", None)
    models = bool(state is not None and state.pipeline is not None and state.warmed)
    gallery_ready, sync = False, None
    if state is not None and state.gallery is not None:
        gallery_ready = bool(await run_in_threadpool(state.gallery.ready))
        sync = await run_in_threadpool(state.gallery.sync_status)
    ready = models and gallery_ready
    body = {"status": "ready" if ready else "not_ready",
            "checks": {"models": models, "gallery": gallery_ready}, "sync": sync}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics (text exposition format)")
async def metrics(request: Request) -> Response:
    registry_owner = request.app.state.metrics
    state = getattr(request.app.state, "facegate", None)
    if state is not None and state.gallery is not None:
        stats = await run_in_threadpool(state.gallery.stats)
        sync = await run_in_threadpool(state.gallery.sync_status)
        registry_owner.update_gallery(stats, sync)
    body, content_type = registry_owner.render()
    return Response(body, media_type=content_type)
