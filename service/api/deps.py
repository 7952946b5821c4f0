"""FastAPI dependencies: the app's shared state (settings, pipeline, gallery, batcher) and auth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from service.batching import MicroBatcher
from service.config import Settings
from service.metrics import Metrics

from .errors import not_ready
from .keys import authenticate


@dataclass
class AppState:
    """Everything the lifespan builds once and the routes share (``app.state.facegate``)."""

    settings: Settings
    metrics: Metrics
    pipeline: Any = None  # service.pipeline.Pipeline
    gallery: Any = None  # service.gallery.GalleryService
    batcher: MicroBatcher | None = None
    cpu_limiter: Any = None  # anyio.CapacityLimiter: images decoded/detected at once
    fetcher: Any = None  # service.api.urls.UrlFetcher: images by URL (shared HTTP client)
    audit: Any = None  # service.gallery.audit.AuditWriter: searches' and refusals' records
    warmed: bool = False
    startup: dict[str, float] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return self.pipeline.embedder.model_id


def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "facegate", None)
    if state is None or state.pipeline is None or state.gallery is None or not state.warmed:
        raise not_ready()
    return state


#: A route parameter receiving the started app's state (503 ``not_ready`` before that).
State = Annotated[AppState, Depends(get_state)]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def require_api_key(request: Request) -> None:
    """``X-API-Key`` must be a configured key (none configured: open); the key found is
    ``request.state.api_key`` for the route's scope check (see ``service.api.keys``)."""
    request.state.api_key = authenticate(request.app.state.keyring,
                                         request.headers.get("x-api-key"))
