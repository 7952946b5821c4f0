"""The audit log over HTTP: recording requests, and ``GET /v1/audit`` (admin scope).

A route that must leave an audit record takes
``entry: IdentifyAudit`` (``Annotated[AuditEntry, Depends(audited("identify"))]``): the entry
(key id, client address, action, the path's gallery) is current while the route runs, so
store writes record it in their own transaction (:mod:`service.gallery.audit`); the route
adds the ids it returns (searches) and names the gallery when it comes in the body.  When
no write recorded it (searches, exports) or the request failed (its error code is the
result), the entry is queued to the background :class:`~service.gallery.audit.AuditWriter`;
a refused request (401/403) is recorded once, as ``refused``, by :mod:`service.api.refusals`
(every route, audited or not), so its entry here is dropped.  ``GET /v1/audit`` shows a key
limited to some galleries only their records.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.gallery import audit
from service.gallery.audit import ACTIONS, AuditEntry

from . import refusals
from .deps import State, require_api_key
from .errors import ApiError, describe
from .keys import ALL_GALLERIES
from .openapi import ERROR_RESPONSES
from .scopes import allow_gallery, caller, key_id, require_scope

router = APIRouter(
    prefix="/v1", tags=["audit"], dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES
)


def audited(
    action: str, *, only_with_gallery: bool = False
) -> Callable[[Request], AsyncIterator[AuditEntry]]:
    """A route dependency: the request's :class:`AuditEntry` for ``action``.
    ``only_with_gallery``: no record unless the route names a gallery (verify against a
    subject, not two photos)."""

    async def entry(request: Request) -> AsyncIterator[AuditEntry]:
        current = audit.begin(
            AuditEntry(
                action,
                key_id=key_id(request),
                client=request.client.host if request.client else None,
                gallery=request.path_params.get("gallery"),
            )
        )
        refused = False
        try:
            yield current
        except Exception as exc:
            status, current.result, _ = describe(exc)
            refused = status in refusals.REFUSED  # recorded by the error handler
            raise
        finally:
            writer = getattr(getattr(request.app.state, "facegate", None), "audit", None)
            wanted = not refused and (current.gallery is not None or not only_with_gallery)
            if writer is not None and wanted and (not current.written or current.result != "ok"):
                writer.record(current)

    return entry


_CURSOR = re.compile(r"[0-9]{1,19}")
MAX_CURSOR = 2**63 - 1  # the largest record id either store can hold

# the audited routes' parameter types (one entry per request)
VerifyAudit = Annotated[AuditEntry, Depends(audited("verify", only_with_gallery=True))]
IdentifyAudit = Annotated[AuditEntry, Depends(audited("identify"))]
EnrolAudit = Annotated[AuditEntry, Depends(audited("enrol"))]
ReenrolAudit = Annotated[AuditEntry, Depends(audited("reenrol"))]
DeleteGalleryAudit = Annotated[AuditEntry, Depends(audited("delete_gallery"))]
DeleteSubjectAudit = Annotated[AuditEntry, Depends(audited("delete_subject"))]
DeleteFaceAudit = Annotated[AuditEntry, Depends(audited("delete_face"))]
ExportAudit = Annotated[AuditEntry, Depends(audited("export"))]


class AuditRecord(BaseModel):
    id: int
    at: str
    key_id: str
    client: str | None
    action: str
    gallery: str | None
    subject_ids: list[str]
    face_ids: list[int]
    result: str
    route: str | None = None
    reason: str | None = None


class AuditPage(BaseModel):
    records: list[AuditRecord]
    next_cursor: str | None


@router.get(
    "/audit",
    response_model=AuditPage,
    summary="Audit records (admin)",
    dependencies=[require_scope("admin")],
)
async def audit_records(
    request: Request,
    state: State,
    gallery: Annotated[str | None, Query(max_length=128)] = None,
    subject_id: Annotated[str | None, Query(max_length=128)] = None,
    action: Annotated[str | None, Query(description=", ".join(ACTIONS))] = None,
    since: Annotated[datetime | None, Query(description="ISO 8601, inclusive")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601, exclusive")] = None,
    cursor: Annotated[str | None, Query(max_length=20)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    """Who enrolled, deleted, searched for or exported whom, and when: in the order the
    records were written (a write's record with it; a search's or export's within about
    half a second, in the background), so that following ``next_cursor`` never misses one.  A
    subject's records stay after the subject is deleted (ids only).  A key limited to some
    galleries sees only their records (403 for ``gallery`` naming another one)."""
    if action is not None and action not in ACTIONS:
        raise ApiError(422, "validation_error", f"action: must be one of {', '.join(ACTIONS)}")
    if cursor is not None and (not _CURSOR.fullmatch(cursor) or int(cursor) > MAX_CURSOR):
        raise ApiError(422, "invalid_cursor", "cursor: not a cursor this service handed out")
    key = caller(request)
    scoped = key is not None and ALL_GALLERIES not in key.galleries
    if gallery is not None:
        allow_gallery(request, gallery)
    filters = {
        "gallery": gallery,
        "subject_id": subject_id,
        "action": action,
        "since": None if since is None else _epoch(since),
        "until": None if until is None else _epoch(until),
        "after": int(cursor or 0),
        "limit": limit,
        "galleries": key.galleries if key is not None and scoped else None,
    }
    records, more = await run_in_threadpool(_query, state, filters)
    return {"records": records, "next_cursor": str(records[-1]["id"]) if more and records else None}


def _query(state, filters: dict) -> tuple[list[dict], bool]:
    state.audit.flush()  # the records queued so far are in the answer
    return state.gallery.store.audit_records(**filters)


def _epoch(value: datetime) -> float:
    if value.tzinfo is None:
        raise ApiError(422, "validation_error", "since/until: give a time zone (e.g. Z)")
    return value.timestamp()
