"""Audit-log queries: ``GET /v1/audit`` and ``facegate audit`` read the log through here.

:func:`audit_query` checks a query's fields once (the action, the cursor, times with a
time zone); :func:`read_audit` reads one page of records from the store, oldest first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from service.gallery.audit import ACTIONS

from .errors import RequestRefused

if TYPE_CHECKING:
    from service.gallery.store import GalleryStore
    from service.records import AuditRecord

_CURSOR = re.compile(r"[0-9]{1,19}")
MAX_CURSOR = 2**63 - 1  # the largest record id either store can hold
MAX_PAGE = 1000


@dataclass(frozen=True)
class AuditQuery:
    """The filters of one page of audit records (times in epoch seconds)."""

    gallery: str | None = None
    subject_id: str | None = None
    action: str | None = None
    since: float | None = None  # inclusive
    until: float | None = None  # exclusive
    after: int = 0  # the last record id seen
    limit: int = 100
    galleries: frozenset[str] | None = None  # only these galleries' records


@dataclass(frozen=True)
class AuditPage:
    records: tuple[AuditRecord, ...]
    more: bool  # records follow the last one

    @property
    def next_cursor(self) -> str | None:
        return str(self.records[-1].id) if self.more and self.records else None


def epoch(value: datetime | None) -> float | None:
    """``value`` in epoch seconds; a time without a time zone is refused."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise RequestRefused(422, "validation_error", "since/until: give a time zone (e.g. Z)")
    return value.timestamp()


def audit_query(
    *,
    gallery: str | None = None,
    subject_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = None,
    limit: int = 100,
    galleries: Collection[str] | None = None,
    allow_gallery: Callable[[str], None] | None = None,
) -> AuditQuery:
    """The query for these fields, or :class:`RequestRefused` (422 ``validation_error`` for
    an unknown action or a time without a zone, 422 ``invalid_cursor``); ``allow_gallery``
    refuses a ``gallery`` the caller may not read (after the action and cursor checks)."""
    if action is not None and action not in ACTIONS:
        raise RequestRefused(
            422, "validation_error", f"action: must be one of {', '.join(ACTIONS)}"
        )
    if cursor is not None and (not _CURSOR.fullmatch(cursor) or int(cursor) > MAX_CURSOR):
        raise RequestRefused(422, "invalid_cursor", "cursor: not a cursor this service handed out")
    if gallery is not None and allow_gallery is not None:
        allow_gallery(gallery)
    return AuditQuery(
        gallery=gallery,
        subject_id=subject_id,
        action=action,
        since=epoch(since),
        until=epoch(until),
        after=int(cursor or 0),
        limit=limit,
        galleries=None if galleries is None else frozenset(galleries),
    )


def read_audit(
    *, store: GalleryStore, query: AuditQuery, flush: Callable[[], None] | None = None
) -> AuditPage:
    """One page of records matching ``query``, oldest first; ``flush`` first writes the
    records queued so far (the service's background audit writer), so they are in it."""
    if flush is not None:
        flush()
    records, more = store.audit_records(
        gallery=query.gallery,
        subject_id=query.subject_id,
        action=query.action,
        since=query.since,
        until=query.until,
        after=query.after,
        limit=min(query.limit, MAX_PAGE),
        galleries=query.galleries,
    )
    return AuditPage(tuple(records), more)
