"""FastAPI dependencies: the app's shared state (settings, pipeline, gallery, batcher) and auth."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from service.batching import MicroBatcher
from service.config import Settings
from service.metrics import Metrics

from .auth import require_api_key  # noqa: F401  (the routers' key check, re-exported)
from .errors import not_ready

if TYPE_CHECKING:
    import anyio

    from service.gallery.audit import AuditWriter
    from service.gallery.service import GalleryService
    from service.pipeline.pipeline import Pipeline

    from .urls import UrlFetcher

#: A service not built yet (None at run time).
_UNSET: Any = None


@dataclass
class AppState:
    """Everything the lifespan builds once and the routes share (``app.state.facegate``).

    The services are None until the lifespan has built them; routes receive the state
    only once it has (:func:`get_state`), so they are typed as what they then are.
    """

    settings: Settings
    metrics: Metrics
    pipeline: Pipeline = _UNSET
    gallery: GalleryService = _UNSET
    batcher: MicroBatcher = _UNSET
    cpu_limiter: anyio.CapacityLimiter = _UNSET  # images decoded/detected at once
    fetcher: UrlFetcher = _UNSET  # images by URL (shared HTTP client)
    audit: AuditWriter = _UNSET  # searches' and refusals' audit records
    loop_watch: asyncio.Task | None = None  # facegate_event_loop_lag_seconds
    warmed: bool = False
    startup: dict[str, float] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return self.pipeline.model_id


def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "facegate", None)
    if state is None or state.pipeline is None or state.gallery is None or not state.warmed:
        raise not_ready()
    return state


#: A route parameter receiving the started app's state (503 ``not_ready`` before that).
State = Annotated[AppState, Depends(get_state)]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings
