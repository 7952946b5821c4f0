"""The audit record of every refused request: the one place that writes it.

Every 401 and 403 the service answers passes through :func:`record` (called by the error
handler of :mod:`service.api.errors` and by the key check that runs before the body is
read, :class:`~service.api.limits.BodyLimitMiddleware`), which queues an
:class:`~service.gallery.audit.AuditEntry` with action ``refused``:

* ``key_id``: the caller's key id; ``anonymous`` without a key (or on an open service),
  ``invalid_key`` with a key that is not configured;
* ``route``: ``METHOD /path/{template}`` of the route refused;
* ``gallery``: the gallery the refusal was about (named in the body, e.g. ``identify``'s
  ``gallery``, verify's ``gallery``, re-enrolment's ``source``), else the path's
  ``{gallery}``, else the query's ``gallery`` or the body's ``gallery`` (or ``source``)
  field when a scope was refused before the route read them (:func:`named_gallery`; not
  for a key refused before the body is read at all);
* ``result``: the error code; ``reason``: its message.

Refusals without a valid key are throttled per client address (see
:mod:`service.gallery.audit`), so a flood of bad keys cannot grow the log without bound.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.types import Message, Scope

from service.gallery.audit import AuditEntry
from service.gallery.names import check_gallery

REFUSED = (401, 403)
_MAX = 256  # characters kept of a name or message taken from the request


def _key_id(scope: Scope, status: int) -> str:
    state = scope.get("state") or {}
    if "api_key" in state:  # authenticated (None: an open service)
        key = state["api_key"]
        return "anonymous" if key is None else str(key.id)
    return "anonymous" if status == 401 else "invalid_key"


def record(
    scope: Scope,
    status: int,
    code: str,
    message: str,
    *,
    gallery: str | None = None,
    route: str | None = None,
    path_params: dict[str, Any] | None = None,
) -> None:
    """Queue the audit record of a refusal (``status`` 401 or 403; others are ignored)."""
    if status not in REFUSED or scope.get("type") != "http":
        return
    app = scope.get("app")
    writer = getattr(getattr(getattr(app, "state", None), "facegate", None), "audit", None)
    if writer is None:  # not started (or stopped): nothing to write to
        return
    if route is None:
        route = getattr(scope.get("route"), "path", None) or scope.get("path", "")
    if gallery is None:
        named = (path_params if path_params is not None else scope.get("path_params") or {}).get(
            "gallery"
        )
        gallery = named if isinstance(named, str) else None
    client = scope.get("client")
    key_id = _key_id(scope, status)
    entry = AuditEntry(
        "refused",
        key_id=key_id,
        client=client[0] if client else None,
        gallery=None if gallery is None else gallery[:_MAX],
        result=code,
        route=f"{scope.get('method', '')} {route}"[:_MAX],
        reason=message[:_MAX],
    )
    unauthenticated = key_id in ("anonymous", "invalid_key")
    writer.record(entry, throttle=(entry.client or "?") if unauthenticated else None)


async def named_gallery(scope: Scope) -> str | None:
    """The valid gallery name in the query's ``gallery`` parameter, else in the body's
    ``gallery`` (else ``source``) field, from the body
    :class:`~service.api.limits.BodyLimitMiddleware` read (JSON, form or multipart); None
    when there is none."""
    values: list[object] = [Request(scope).query_params.get("gallery")]
    body = scope.get("facegate.body")
    content_type = Request(scope).headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if not body:
            pass
        elif content_type == "application/json" or content_type.endswith("+json"):
            data = json.loads(body)
            if isinstance(data, dict):
                values += [data.get("gallery"), data.get("source")]
        elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            sent = False

            async def receive() -> Message:
                nonlocal sent
                if sent:
                    return {"type": "http.disconnect"}
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            form_limits = {"max_files": 64, "max_fields": 256, "max_part_size": len(body)}
            async with Request(scope, receive).form(**form_limits) as form:
                values += [form.get("gallery"), form.get("source")]
    except Exception:  # not a body this can read: no gallery named in it
        pass
    for value in values:
        if isinstance(value, str):
            try:
                return check_gallery(value)
            except ValueError:
                continue
    return None
