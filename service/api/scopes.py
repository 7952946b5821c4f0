"""Route-level authorisation: each ``/v1`` route declares the scope it needs.

``dependencies=[require_scope("enrol")]`` on a route checks the caller's key (found by
``deps.require_api_key``) against that scope and, when the path names a ``{gallery}``, that
gallery; routes whose gallery comes in the body call :func:`allow_gallery` once they know
it.  The rule itself is :func:`service.api.keys.authorise`.
"""

from __future__ import annotations

from fastapi import Depends, Request

from .auth import given_key
from .keys import ApiKey, authenticate, authorise


def caller(request: Request) -> ApiKey | None:
    """The caller's key (``None``: the service is open), authenticating if not done yet."""
    if not hasattr(request.state, "api_key"):
        request.state.api_key = authenticate(request.app.state.keyring, given_key(request))
    return request.state.api_key


def require_scope(scope: str | None):
    """A route dependency: the caller's key has ``scope`` (``None``: any valid key) and may
    touch the path's ``{gallery}``, if any; else 401/403."""

    def check(request: Request) -> None:
        authorise(caller(request), scope, request.path_params.get("gallery"))

    check.scope = scope  # type: ignore[attr-defined]  # read by the route-coverage test
    return Depends(check)


def allow_gallery(request: Request, gallery: str) -> None:
    """403 unless the caller's key may touch ``gallery`` (named in the request body)."""
    authorise(caller(request), None, gallery)


def may_touch(request: Request, gallery: str) -> bool:
    key = caller(request)
    return key is None or key.may_touch(gallery)


def key_id(request: Request) -> str:
    """The caller's key id, or ``anonymous`` on an open service."""
    key = caller(request)
    return "anonymous" if key is None else key.id
