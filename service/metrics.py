"""Prometheus metrics of one app instance, kept in the app's own ``CollectorRegistry``.

Each app (and so each test app) owns a fresh registry: nothing is registered
in ``prometheus_client``'s global default registry.  With several uvicorn
workers every worker answers ``/metrics`` with its own counters.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.4,
    0.6,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
    30.0,
)
STAGE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.08,
    0.15,
    0.3,
    0.6,
    1.2,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
FACE_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


LOOP_LAG_INTERVAL_S = 0.1


async def watch_event_loop(metrics: Metrics, interval: float = LOOP_LAG_INTERVAL_S) -> None:
    """Observe, for ever, how much later than asked a sleep on the running loop wakes up
    (``facegate_event_loop_lag_seconds``)."""
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(interval)
        metrics.loop_lag.observe(max(0.0, time.perf_counter() - asked - interval))


#: Why admission control drops a request unrun (``facegate_admission_refused_total``).
ADMISSION_REFUSALS = ("overloaded", "deadline", "disconnected")


class Metrics:
    """Every metric the service exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "facegate_http_requests_total",
            "HTTP requests answered",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "facegate_http_request_seconds",
            "HTTP request latency",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "facegate_stage_seconds",
            "time per pipeline stage per request, by route",
            ["route", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "facegate_embed_batch_size",
            "faces per embedding batch run by the micro-batcher",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_wait = Histogram(
            "facegate_embed_batch_wait_seconds",
            "time a face waited in the micro-batcher queue",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.faces_per_image = Histogram(
            "facegate_faces_per_image", "faces detected per image", buckets=FACE_BUCKETS, registry=r
        )
        self.rejects = Counter(
            "facegate_rejects_total", "requests refused, by error code", ["reason"], registry=r
        )
        self.admission_wait = Histogram(
            "facegate_admission_wait_seconds",
            "time an admitted request waited for a pipeline slot",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.admission_served = Histogram(
            "facegate_admission_served_seconds",
            "arrival to answer of admitted requests (wait for a slot included; refused "
            "ones, answered at once, left out), by route",
            ["route"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.admission_refused = Counter(
            "facegate_admission_refused_total",
            "requests dropped by admission control unrun: "
            "overloaded (queue full), deadline (waited too long), disconnected (client left)",
            ["reason"],
            registry=r,
        )
        for reason in ADMISSION_REFUSALS:  # exported at 0 from the start, for dashboards
            self.admission_refused.labels(reason=reason)
        self.admission_in_flight = Gauge(
            "facegate_admission_in_flight", "requests holding a pipeline slot", registry=r
        )
        self.admission_queued = Gauge(
            "facegate_admission_queued", "requests waiting for a pipeline slot", registry=r
        )
        self.admission_limit = Gauge(
            "facegate_admission_limit",
            "admission bounds: in_flight slots, queue length",
            ["bound"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "facegate_event_loop_lag_seconds",
            "how late the server's event loop ran a timer (sampled every "
            f"{LOOP_LAG_INTERVAL_S} s): the wait every request sees before and between its "
            "awaits; seconds here mean the loop is starved (CPU, or threads holding the GIL)",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.gallery_subjects = Gauge(
            "facegate_gallery_subjects", "subjects per gallery", ["gallery"], registry=r
        )
        self.gallery_faces = Gauge(
            "facegate_gallery_faces", "faces per gallery", ["gallery"], registry=r
        )
        self.sync_lag = Gauge(
            "facegate_gallery_sync_lag", "change-log entries not yet applied", registry=r
        )
        self.sync_age = Gauge(
            "facegate_gallery_sync_age_seconds",
            "seconds since the last successful sync with the store began",
            registry=r,
        )

    def observe_stages(self, scope: Scope, stages: dict[str, float]) -> None:
        """Stage times of one request, labelled by its route template (as the HTTP series)."""
        route = route_label(scope)
        for stage, seconds in stages.items():
            self.stage.labels(route=route, stage=stage).observe(seconds)

    def update_gallery(self, stats: dict | None, sync: dict | None) -> None:
        """Refresh the gallery gauges from ``GalleryService.stats()`` / ``sync_status()``."""
        if stats:
            self.gallery_subjects.clear()
            self.gallery_faces.clear()
            for g in _galleries(stats):
                name = str(g.get("name"))
                self.gallery_subjects.labels(gallery=name).set(g.get("subjects", 0) or 0)
                self.gallery_faces.labels(gallery=name).set(g.get("faces", 0) or 0)
        if sync and sync.get("lag") is not None:
            self.sync_lag.set(sync["lag"])
        if sync and sync.get("last_synced_age_s") is not None:
            self.sync_age.set(sync["last_synced_age_s"])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_label(scope: Scope) -> str:
    """The matched route template of a request (``/v1/galleries/{gallery}/...``).

    FastAPI records the route of its API routes in the scope; the others (``/docs``,
    ``/openapi.json``, ``/redoc``, the docs' static files) are matched here against the
    app's routes.  A path no route serves is ``unmatched``.
    """
    path = getattr(scope.get("route"), "path", None)
    if path:
        return str(path)
    # A mount (the docs' assets) has moved its prefix into root_path: match the path as
    # the app received it.
    received = {**scope, "root_path": scope.get("app_root_path", "")}
    for route in getattr(scope.get("app"), "routes", ()):
        match, _ = route.matches(received)
        if match == Match.FULL:
            return str(getattr(route, "path", None) or "unmatched")
    return "unmatched"


def _galleries(stats: dict) -> list[dict]:
    galleries = stats.get("galleries", [])
    if isinstance(galleries, dict):  # {name: {...}}
        return [{"name": k, **(v if isinstance(v, dict) else {})} for k, v in galleries.items()]
    return list(galleries)


class MetricsMiddleware:
    """Counts requests and times them, labelled by the matched route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = route_label(scope)
            method = scope.get("method", "")
            code = str(status["code"])
            self.metrics.requests.labels(route=path, method=method, status=code).inc()
            self.metrics.latency.labels(route=path, method=method).observe(
                time.perf_counter() - start
            )
