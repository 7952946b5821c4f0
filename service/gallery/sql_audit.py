"""The audit log's rows: written with the transaction they describe (or on their own)
and read back page by page."""

from __future__ import annotations

import json
from collections.abc import Collection
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from service.records import AuditRecord

if TYPE_CHECKING:
    from service.gallery.audit import AuditEntry
    from service.gallery.sql_dialect import Cursor


class AuditSQL:
    """The audit table over :class:`~service.gallery.sql.SQLStore`'s transactions (mixed
    into it)."""

    if TYPE_CHECKING:  # provided by SQLStore

        def _read(self) -> AbstractContextManager[Cursor]: ...
        def _write_tx(self) -> AbstractContextManager[Cursor]: ...

    @staticmethod
    def _insert_audit(
        cur: Cursor,
        entries: list[AuditEntry],
        changes: list[tuple[int | None, str | None]] | None = None,
    ) -> None:
        for entry in entries:
            if changes is not None:  # this transaction's own changes
                subjects = list(dict.fromkeys(s for _, s in changes if s is not None))
                faces = list(dict.fromkeys(int(f) for f, _ in changes if f is not None))
            else:
                subjects, faces = entry.subject_ids, entry.face_ids
            cur.execute(
                "INSERT INTO audit (at, key_id, client, action, gallery, subject_ids, face_ids, "
                "result, route, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.at,
                    entry.key_id,
                    entry.client,
                    entry.action,
                    entry.gallery,
                    json.dumps(subjects, ensure_ascii=False),
                    json.dumps(faces),
                    entry.result,
                    entry.route,
                    entry.reason,
                ),
            )

    def append_audit(self, entries: list[AuditEntry]) -> None:
        with self._write_tx() as cur:
            self._insert_audit(cur, entries)

    def prune_audit(self, before: float) -> int:
        with self._write_tx() as cur:
            return int(cur.execute("DELETE FROM audit WHERE at < ?", (float(before),)).rowcount)

    def audit_records(
        self,
        *,
        gallery: str | None = None,
        subject_id: str | None = None,
        action: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after: int = 0,
        limit: int = 100,
        galleries: Collection[str] | None = None,
    ) -> tuple[list[AuditRecord], bool]:
        sql = (
            "SELECT id, at, key_id, client, action, gallery, subject_ids, face_ids, result, "
            "route, reason FROM audit WHERE id > ?"
        )
        params: list = [int(after)]
        for column, value in (("gallery", gallery), ("action", action)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if galleries is not None:  # only these galleries' records (none: an empty answer)
            names = sorted(galleries)
            sql += f" AND gallery IN ({', '.join('?' * len(names)) or 'NULL'})"
            params += names
        if since is not None:
            sql += " AND at >= ?"
            params.append(float(since))
        if until is not None:
            sql += " AND at < ?"
            params.append(float(until))
        if subject_id is not None:
            needle = json.dumps(subject_id, ensure_ascii=False)
            needle = needle.replace("!", "!!").replace("%", "!%").replace("_", "!_")
            sql += " AND subject_ids LIKE ? ESCAPE '!'"
            params.append(f"%{needle}%")
        sql += " ORDER BY id LIMIT ?"
        params.append(int(limit) + 1)
        with self._read() as cur:
            rows = cur.execute(sql, params).all_named()
        more = len(rows) > limit
        return [
            AuditRecord.from_row(r, json.loads(r["subject_ids"]), json.loads(r["face_ids"]))
            for r in rows[:limit]
        ], more
