"""Who may call what: the key checks (route dependencies), and finding a route's checks so
that :class:`~service.api.limits.BodyLimitMiddleware` runs them before reading any body.

A route is guarded by depending on a function registered with :func:`guard`
(``Depends(require_api_key)``, usually on its router).  FastAPI runs the guard as a
dependency; the body middleware finds the same guards through :func:`route_guards`
and runs them first, so a request without a valid key is refused before its body is read.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.routing import compile_path
from starlette.types import Scope

try:  # FastAPI >= 0.16x nests included routers; this flattens them (as the OpenAPI schema does)
    from fastapi.routing import iter_route_contexts
except ImportError:  # older FastAPI: app.routes is already flat
    # a different function of the same name (no RouteContext in older FastAPI)
    def iter_route_contexts(routes: Sequence[Any]) -> Iterator[Any]:  # type: ignore[misc]
        return iter(routes)


from .errors import forbidden, unauthorized
from .keys import authenticate

Guard = Callable[[Request], None]
_GUARDS: set[Guard] = set()


def guard(fn: Guard) -> Guard:
    """Register ``fn`` as a key check that may run before the body is read (headers only)."""
    _GUARDS.add(fn)
    return fn


def _given_key(request: Request) -> str | None:
    """``X-API-Key``, or an ``Authorization: Bearer`` token (what Prometheus sends)."""
    given = request.headers.get("x-api-key")
    if not given:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    return given or None


def check_key(request: Request, keys: Iterable[str]) -> None:
    """401 without a key, 403 with a key that is none of ``keys``."""
    given = _given_key(request)
    if not given:
        raise unauthorized()
    given_b = given.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:  # compare with every key so timing does not reveal which matched
        ok |= hmac.compare_digest(given_b, key.encode("utf-8"))
    if not ok:
        raise forbidden()


def given_key(request: Request) -> str | None:
    """The key the caller sent (``X-API-Key`` or ``Authorization: Bearer``), if any."""
    return _given_key(request)


@guard
def require_api_key(request: Request) -> None:
    """The caller's key must be one of the keyring's (``FACEGATE_API_KEYS`` and
    ``FACEGATE_API_KEYS_FILE``; none configured: open).  The key found is
    ``request.state.api_key``, for the route's scope check (:mod:`service.api.scopes`)."""
    request.state.api_key = authenticate(request.app.state.keyring, _given_key(request))


@guard
def require_metrics_key(request: Request) -> None:
    """``/metrics`` needs ``settings.metrics_key`` when one is set (else it is open)."""
    key = request.app.state.settings.metrics_key
    if key:
        check_key(request, [key])


def _guards_of(dependant) -> Iterable[Guard]:
    for dep in dependant.dependencies:
        if dep.call in _GUARDS:
            yield dep.call
        yield from _guards_of(dep)


def _route_table(app) -> list[tuple[re.Pattern, set[str], list[Guard], str]]:
    """(path regex, methods, guards, path template) of every route of ``app``; built once."""
    table = getattr(app.state, "route_guards", None)
    if table is None:
        table = []
        for route in iter_route_contexts(app.routes):
            path = getattr(route, "path", None)
            if not path:
                continue
            dependant = getattr(route, "dependant", None)
            guards = list(dict.fromkeys(_guards_of(dependant))) if dependant else []
            table.append((compile_path(path)[0], set(route.methods or ()), guards, path))
        app.state.route_guards = table
    return table


@dataclass(frozen=True)
class RouteMatch:
    """The route a request reaches, as seen before the router runs."""

    guards: list[Guard]  # empty: an open route
    path: str  # its template, ``/v1/galleries/{gallery}``
    params: dict[str, str]  # the path's parameters, unconverted


def route_match(scope: Scope) -> RouteMatch | None:
    """The route that ``scope`` reaches, or None when no route takes this method and path
    (the answer is a 404 or 405 that reads no body)."""
    app = scope.get("app")
    if app is None:
        return RouteMatch([], str(scope.get("path", "")), {})
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):  # as Starlette's router sees it
        path = path[len(root) :] or "/"
    method = scope.get("method")
    for regex, methods, guards, template in _route_table(app):
        if method in methods and (found := regex.match(path)):
            return RouteMatch(guards, template, found.groupdict())
    return None


def route_guards(scope: Scope) -> list[Guard] | None:
    """The guards of the route that ``scope`` reaches (empty: an open route), or None when
    no route takes this method and path."""
    match = route_match(scope)
    return None if match is None else match.guards
