"""The one place that turns every error into an HTTP answer.

Every error leaves the service as ``{"error": {"code": "...", "message": "..."}}``
with a fitting status.  Domain errors (pipeline, gallery, model registry) carry
their own ``code`` and ``status`` class attributes; the REST layer's own errors
are :class:`ApiError`; FastAPI's validation errors and Starlette's 404/405 are
rewritten into the same shape.  Anything unexpected becomes a logged 500 whose
message does not leak internals.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.usecases.errors import RequestRefused

from . import refusals

log = logging.getLogger("facegate.api")

#: Status -> code for Starlette/FastAPI HTTP exceptions raised by the framework itself.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    503: "not_ready",
}


class ApiError(Exception):
    """An error raised by the REST layer itself (bad field, auth, limits, readiness);
    ``gallery``: the gallery a refusal is about (for its audit record)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict | None = None,
        gallery: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.gallery = gallery


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def unauthorized(message: str = "missing API key: send it in the X-API-Key header") -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "ApiKey"})


def forbidden(message: str = "invalid API key") -> ApiError:
    return ApiError(403, "forbidden", message)


def request_too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")


def request_timeout(seconds: float) -> ApiError:
    return ApiError(408, "request_timeout", f"the request body did not arrive within {seconds} s")


def unsupported_media_type(message: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", message)


def not_ready(message: str = "service is starting or shutting down") -> ApiError:
    return ApiError(503, "not_ready", message)


def overloaded(in_flight: int, queue: int, retry_after_s: int) -> ApiError:
    return ApiError(
        503,
        "overloaded",
        f"the service is at capacity ({in_flight} requests running, {queue} waiting); retry later",
        headers={"Retry-After": str(retry_after_s)},
    )


def deadline_exceeded(waited_s: float) -> ApiError:
    return ApiError(
        504,
        "deadline_exceeded",
        f"the request waited {waited_s:g} s for admission and was dropped unrun "
        "(its deadline: X-Request-Timeout, or the server's request timeout)",
    )


def invalid_header(message: str) -> ApiError:
    return ApiError(400, "invalid_header", message)


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def describe(exc: BaseException) -> tuple[int, str, str]:
    """(status, code, message) for any error; the mapping used by every handler."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.message
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    if isinstance(status, int) and isinstance(code, str):
        # Domain errors: service.pipeline.errors.PipelineError, service.gallery.errors.*
        return status, code, str(exc) or code
    if isinstance(exc, StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), detail
    if isinstance(exc, RequestValidationError):
        return 422, "validation_error", validation_message(exc)
    return 500, "internal_error", "internal server error"


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    status, code, message = describe(exc)
    if status >= 500 and not isinstance(exc, ApiError):
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None and 400 <= status < 500:
        metrics.rejects.labels(reason=code).inc()
    if status in refusals.REFUSED:
        gallery = getattr(exc, "gallery", None)
        if gallery is None and "gallery" not in request.path_params:
            gallery = await refusals.named_gallery(request.scope)
        refusals.record(request.scope, status, code, message, gallery=gallery)
    return error_response(status, code, message, getattr(exc, "headers", None))


def install(app: FastAPI, domain_errors: tuple[type[Exception], ...] = ()) -> None:
    """Register the handlers on ``app`` (domain error base classes are passed in)."""
    app.add_exception_handler(ApiError, _handle)
    app.add_exception_handler(StarletteHTTPException, _handle)
    app.add_exception_handler(RequestValidationError, _handle)
    for cls in (*domain_errors, RequestRefused):  # and the use cases' refusals
        app.add_exception_handler(cls, _handle)
    app.add_exception_handler(Exception, _handle)
