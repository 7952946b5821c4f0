"""Liveness, readiness (open) and Prometheus metrics (open unless ``settings.metrics_key``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .auth import require_metrics_key

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: models warmed, gallery index built and in sync")
async def readyz(request: Request) -> JSONResponse:
    """200 when the models are loaded and warmed and the gallery is ready (its index built
    and its last sync with the store successful and recent: see ``sync_status``), else 503
    with the ``reason``.  The body reports each check and the replication state (``sync``)."""
    state = getattr(request.app.state, "facegate", None)
    models = bool(state is not None and state.pipeline is not None and state.warmed)
    sync = None
    if state is not None and state.gallery is not None:
        sync = await run_in_threadpool(state.gallery.sync_status)
    gallery_ready = bool(sync and sync["ready"])
    ready = models and gallery_ready
    body = {
        "status": "ready" if ready else "not_ready",
        "checks": {"models": models, "gallery": gallery_ready},
        "sync": sync,
    }
    if not ready:
        body["reason"] = (
            "models not loaded and warmed yet"
            if not models
            else sync["reason"]
            if sync
            else "gallery not started yet"
        )
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    dependencies=[Depends(require_metrics_key)],
)
async def metrics(request: Request) -> Response:
    registry_owner = request.app.state.metrics
    state = getattr(request.app.state, "facegate", None)
    if state is not None and state.gallery is not None:
        stats = await run_in_threadpool(state.gallery.stats)
        sync = await run_in_threadpool(state.gallery.sync_status)
        registry_owner.update_gallery(stats, sync)
    body, content_type = registry_owner.render()
    return Response(body, media_type=content_type)
