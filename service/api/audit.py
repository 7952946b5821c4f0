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

from collections.abc import AsyncIterator, Callable
from datetime import datetime
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.gallery import audit
from service.gallery.audit import ACTIONS, AuditEntry
from service.usecases.audit import audit_query, read_audit

from . import refusals
from .deps import State, require_api_key
from .errors import describe
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
    key = caller(request)
    scoped = key is not None and ALL_GALLERIES not in key.galleries
    query = audit_query(
        gallery=gallery,
        subject_id=subject_id,
        action=action,
        since=since,
        until=until,
        cursor=cursor,
        limit=limit,
        galleries=key.galleries if key is not None and scoped else None,
        allow_gallery=lambda name: allow_gallery(request, name),
    )
    page = await run_in_threadpool(
        partial(read_audit, store=state.gallery.store, query=query, flush=state.audit.flush)
    )
    return {"records": list(page.records), "next_cursor": page.next_cursor}
