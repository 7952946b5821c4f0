"""Request limits before any route runs: key checks, body size and body read time.

In this order, before a byte of the body is read:

1. the route's key checks (:func:`service.api.auth.route_match`): a request without a
   valid key is refused (401/403) from its headers alone; a request for no route goes
   straight to its 404/405, its body unread;
2. ``Content-Length`` over ``max_bytes``: 413.

Then the body is read in full, up to the limit (chunked uploads, lying headers: 413
as soon as it passes it), within ``body_timeout_s`` (slower: 408), before the app sees
it, so a too-large or too-slow request never reaches a route.  Every refusal closes
the connection (the rest of the body is never read).  A refused key check is audited
(:mod:`service.api.refusals`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import refusals
from .auth import route_match
from .errors import ApiError, error_response, request_timeout, request_too_large

if TYPE_CHECKING:
    from service.metrics import Metrics


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        metrics: Metrics | None = None,
        body_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics  # counts the refusals
        self.body_timeout_s = body_timeout_s

    async def _refuse(self, err: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
        if self.metrics is not None:
            self.metrics.rejects.labels(reason=err.code).inc()
        response = error_response(
            err.status,
            err.code,
            err.message,
            headers={**(err.headers or {}), "Connection": "close"},
        )
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_match(scope)
        if route is None:  # no such route: a 404/405 that never reads the body
            await self.app(scope, receive, send)
            return
        try:
            for check in route.guards:
                check(Request(scope))
        except ApiError as err:
            refusals.record(
                scope, err.status, err.code, err.message, route=route.path, path_params=route.params
            )
            await self._refuse(err, scope, receive, send)
            return
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
                break
        if length is not None and length > self.max_bytes:
            await self._refuse(request_too_large(self.max_bytes), scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        with anyio.move_on_after(self.body_timeout_s) as deadline:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                total += len(body)
                if total > self.max_bytes:
                    await self._refuse(request_too_large(self.max_bytes), scope, receive, send)
                    return
                chunks.append(body)
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught and self.body_timeout_s is not None:
            await self._refuse(request_timeout(self.body_timeout_s), scope, receive, send)
            return
        replayed = False
        body = b"".join(chunks)
        scope["facegate.body"] = body  # the gallery a refusal is about (service.api.refusals)

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
