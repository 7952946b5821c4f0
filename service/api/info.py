"""``GET /v1/info``: what this instance serves (models, thresholds, providers, galleries,
batching)."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from service.pipeline.decision import available_points

from .deps import State, require_api_key
from .keys import authorise
from .scopes import caller, may_touch, require_scope

router = APIRouter(prefix="/v1", tags=["info"], dependencies=[Depends(require_api_key)])


def _card(card) -> dict:
    return {
        "name": card.name,
        "id": card.id,
        "task": card.task,
        "family": card.family,
        "sha256": card.sha256,
        "licence": card.licence,
        "commercial_use": card.commercial_use,
        "embedding_dim": card.embedding_dim,
        "thresholds": dict(card.thresholds or {}),
    }


def _version() -> str | None:
    try:
        return version("facegate")
    except PackageNotFoundError:
        return None


def _providers(component) -> list[str]:
    """The providers of a component's ONNX Runtime session(s) (MTCNN runs three), in order."""
    sessions = getattr(component, "sessions", None)
    if isinstance(sessions, dict):
        sessions = list(sessions.values())
    elif getattr(component, "session", None) is not None:
        sessions = [component.session]
    providers: list[str] = []
    for session in sessions or []:
        providers += [p for p in session.get_providers() if p not in providers]
    return providers


def _visible(request: Request, stats: dict) -> dict:
    """The gallery statistics, limited to the galleries the caller's key may touch."""
    galleries = [g for g in stats["galleries"] if may_touch(request, g["name"])]
    return {
        **stats,
        "galleries": galleries,
        "subjects": sum(g["subjects"] for g in galleries),
        "faces": sum(g["faces"] for g in galleries),
    }


@router.get(
    "/info",
    summary="Served models, thresholds, providers, gallery sizes, batching",
    dependencies=[require_scope(None)],
)
async def info(
    request: Request,
    state: State,
    check_index: Annotated[
        bool,
        Query(
            description="also compare this replica's index with the store, exactly (every face "
            "id and its subject, per gallery) in `index_check`; reads every face id "
            "of the store; `admin` scope"
        ),
    ] = False,
) -> dict:
    """What this instance serves; ``galleries`` lists only the galleries the caller's key
    may touch, and ``check_index`` needs the ``admin`` scope (its answer is limited to
    those galleries too)."""
    pipeline, settings = state.pipeline, state.settings
    detector = _card(pipeline.detector_card)
    detector["providers"] = _providers(pipeline.detector)
    recognizer = _card(pipeline.recognizer_card)
    recognizer["providers"] = _providers(state.batcher.embedder)
    recognizer["operating_points"] = available_points(pipeline.recognizer_card)
    recognizer["default_operating_point"] = pipeline.recognizer_card.default_operating_point
    recognizer["selection"] = pipeline.recognizer_selection
    calibration = pipeline.recognizer_card.calibration
    recognizer["calibration"] = (
        calibration.summary() if calibration is not None else {"source": "card"}
    )
    extra = {}
    if check_index:
        authorise(caller(request), "admin")
        check = await run_in_threadpool(state.gallery.check_index)
        check["galleries"] = [g for g in check["galleries"] if may_touch(request, g["name"])]
        check["consistent"] = all(g["consistent"] for g in check["galleries"])
        extra["index_check"] = check
    return {
        "version": _version(),
        "worker_pid": os.getpid(),
        "models": {"detector": detector, "recognizer": recognizer},
        "matching": {
            "fusion": "max: a subject scores as its best enrolled face",
            "metric": "cosine",
            "index_type": settings.index_type,
        },
        "galleries": _visible(request, await run_in_threadpool(state.gallery.stats)),
        "sync": await run_in_threadpool(state.gallery.sync_status),
        "batching": {**state.batcher.config(), **state.batcher.stats()},
        "limits": {
            "max_image_bytes": settings.max_image_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_request_bytes": settings.max_request_bytes,
            "max_decode_bytes": settings.max_decode_bytes,
            "decode_budget_bytes": settings.decode_budget_bytes,
            "top_k_max": settings.top_k_max,
        },
        "image_urls": {
            "enabled": bool(settings.url_allowlist),
            "allowed_hosts": list(settings.url_allowlist),
            "timeout_s": settings.url_timeout_s,
        },
        "store_images": settings.store_images,
        "startup_seconds": state.startup,
        **extra,
    }
