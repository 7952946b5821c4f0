"""Request-size limit: refuse bodies over ``settings.max_request_bytes`` with a 413.

Checked twice: from ``Content-Length`` before anything is read, and while the body
streams in (chunked uploads, lying headers).  The body is read in full, up to the
limit, before the app sees it, so a too-large request never reaches a route.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response, request_too_large


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, metrics=None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics  # service.metrics.Metrics: counts the refusals

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = request_too_large(self.max_bytes)
        if self.metrics is not None:
            self.metrics.rejects.labels(reason=err.code).inc()
        response = error_response(err.status, err.code, err.message,
                                  headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
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
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
