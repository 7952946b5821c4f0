"""Admission control: a bounded pipeline, a bounded wait queue and request deadlines.

Every request that does pipeline work (``POST /v1/...``: verify, identify, extract,
enrolment) must hold one of ``max_in_flight`` slots while the app runs it.  A request
that finds every slot taken waits in a FIFO queue of at most ``max_queue`` requests;
past that bound it is answered at once ``503 overloaded`` with a ``Retry-After``
header instead of queueing without limit.  Health, readiness, metrics and every other
request pass straight through, so they are never refused nor starved.

A waiting request is dropped before it costs any pipeline work when its deadline
passes (``504 deadline_exceeded``: ``settings.request_timeout_s`` after it arrived, or
sooner with the client's ``X-Request-Timeout`` seconds) or when its client
disconnects (no answer: nobody is listening).  The deadline bounds the wait for
admission; once admitted a request runs to the end.

The bounds are per worker process; the defaults derive from the machine's cores and
the micro-batcher (:func:`admission_bounds`).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.metrics import Metrics, route_label

from .errors import ApiError, deadline_exceeded, error_response, invalid_header, overloaded

TIMEOUT_HEADER = b"x-request-timeout"


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def admission_bounds(settings: Settings) -> tuple[int, int]:
    """(max_in_flight, max_queue): the settings, or (0) derived from cores and batcher.

    In flight: four requests per core (enough to keep every core busy while other
    requests wait on I/O or the batcher), at most one embedding batch (``max_batch``)
    when batching is on.  Queue: as many again, so that an accepted request waits at
    most about one pipeline's worth of work.
    """
    in_flight = settings.max_in_flight
    if in_flight <= 0:
        in_flight = 4 * cores()
        if settings.batching:
            in_flight = min(in_flight, settings.max_batch)
        in_flight = max(1, in_flight)
    queue = settings.max_queue if settings.max_queue >= 0 else in_flight
    return in_flight, queue


class Overloaded(Exception):
    """Every slot is taken and the wait queue is full."""


@dataclass
class _Waiter:
    future: asyncio.Future
    since: float


class Admission:
    """At most ``max_in_flight`` holders, at most ``max_queue`` waiting (FIFO)."""

    def __init__(self, max_in_flight: int, max_queue: int) -> None:
        if max_in_flight < 1 or max_queue < 0:
            raise ValueError("need max_in_flight >= 1 and max_queue >= 0")
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.in_flight = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> asyncio.Future | None:
        """Take a slot now (``None``), or join the queue (a future resolved when a slot
        is handed over); :class:`Overloaded` when the queue is full."""
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            return None
        if len(self._waiters) >= self.max_queue:
            raise Overloaded
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(future, time.perf_counter()))
        return future

    def abandon(self, future: asyncio.Future) -> None:
        """A waiter gives up; if a slot was already handed to it, pass it on."""
        if future.done() and not future.cancelled():
            self.release()
            return
        future.cancel()
        self._waiters = deque(w for w in self._waiters if w.future is not future)

    def release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)
                return
        self.in_flight -= 1


def parse_timeout(scope: Scope, server_timeout_s: float) -> float | None:
    """Seconds this request may wait: the client's ``X-Request-Timeout`` (a positive number
    of at most the server's own ``request_timeout_s``, else 400 ``invalid_header``; 0 there
    means no server deadline), or ``None``."""
    limit = server_timeout_s if server_timeout_s > 0 else None
    for name, value in scope.get("headers", ()):
        if name == TIMEOUT_HEADER:
            try:
                given = float(value.decode("latin-1"))
            except ValueError:
                given = math.nan
            if not math.isfinite(given) or given <= 0:
                raise invalid_header("X-Request-Timeout must be a positive number of seconds")
            if limit is not None and given > limit:
                raise invalid_header(
                    f"X-Request-Timeout must be at most the server's request timeout ({limit:g} s)"
                )
            return given
    return limit


def is_admitted_route(scope: Scope) -> bool:
    """Requests that do pipeline work: every ``POST`` under ``/v1/``."""
    return scope.get("method") == "POST" and str(scope.get("path", "")).startswith("/v1/")


class AdmissionMiddleware:
    """Runs admitted requests under :class:`Admission`; must sit inside the body limit
    (which reads the body first), so that a waiting request's disconnect can be seen."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.enabled = settings.admission
        self.timeout_s = settings.request_timeout_s
        self.retry_after_s = settings.retry_after_s
        self.admission = Admission(*admission_bounds(settings))
        self.metrics = metrics
        metrics.admission_limit.labels(bound="in_flight").set(self.admission.max_in_flight)
        metrics.admission_limit.labels(bound="queue").set(self.admission.max_queue)

    def config(self) -> dict:
        return {
            "enabled": self.enabled,
            "max_in_flight": self.admission.max_in_flight,
            "max_queue": self.admission.max_queue,
            "request_timeout_s": self.timeout_s,
            "in_flight": self.admission.in_flight,
            "queued": self.admission.queued,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled or not is_admitted_route(scope):
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()
        try:
            timeout = parse_timeout(scope, self.timeout_s)
        except ApiError as exc:
            await self._answer(scope, receive, send, exc)
            return
        try:
            future = self.admission.try_acquire()
        except Overloaded:
            self._refused("overloaded")
            await self._answer(scope, receive, send, self._overloaded())
            return
        if future is not None:
            self._gauges()
            outcome, receive, watcher = await self._wait(future, receive, arrived, timeout)
            if outcome != "admitted":
                self._refused(outcome)
                self._gauges()
                if outcome == "deadline":
                    await self._answer(scope, receive, send, deadline_exceeded(timeout or 0.0))
                return
        else:
            watcher = None
        self.metrics.admission_wait.observe(time.perf_counter() - arrived)
        self._gauges()
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.release()
            self.metrics.admission_served.labels(route=route_label(scope)).observe(
                time.perf_counter() - arrived
            )
            self._gauges()
            if watcher is not None and not watcher.done():
                watcher.cancel()

    async def _wait(
        self, future: asyncio.Future, receive: Receive, arrived: float, timeout: float | None
    ) -> tuple[str, Receive, asyncio.Future | None]:
        """Wait for a slot, the deadline or the client's disconnect, whichever comes first;
        returns the outcome, the ``receive`` the app must use from then on and the task
        watching for the disconnect (cancelled once the request is answered)."""
        first = await receive()  # the body, already read by the body limit
        watcher = None
        if first["type"] == "http.disconnect":
            self.admission.abandon(future)
            return "disconnected", receive, None
        if not first.get("more_body", False):
            watcher = asyncio.ensure_future(receive())  # resolves on disconnect
        waits = {future} if watcher is None else {future, watcher}
        left = None if timeout is None else max(0.0, arrived + timeout - time.perf_counter())
        await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if watcher is not None and watcher.done():
            self.admission.abandon(future)
            return "disconnected", receive, None
        if not future.done():
            self.admission.abandon(future)
            if watcher is not None:
                watcher.cancel()
            return "deadline", receive, None
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            if watcher is not None:
                return await watcher
            return await receive()

        return "admitted", replay, watcher

    def _overloaded(self) -> ApiError:
        return overloaded(
            self.admission.max_in_flight, self.admission.max_queue, self.retry_after_s
        )

    def _refused(self, reason: str) -> None:
        self.metrics.admission_refused.labels(reason=reason).inc()

    def _gauges(self) -> None:
        self.metrics.admission_in_flight.set(self.admission.in_flight)
        self.metrics.admission_queued.set(self.admission.queued)

    @staticmethod
    async def _answer(scope: Scope, receive: Receive, send: Send, exc: ApiError) -> None:
        response = error_response(exc.status, exc.code, exc.message, headers=exc.headers)
        await response(scope, receive, send)
