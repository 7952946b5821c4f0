"""The change log: every write that changes an index appends an entry in its own
transaction (:meth:`ChangeLogSQL._log`); replicas follow it (:meth:`ChangeLogSQL.changes_after`)."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from service.gallery.store import Change

if TYPE_CHECKING:
    from service.gallery.sql_dialect import Cursor


class ChangeLogSQL:
    """The change-log tables over :class:`~service.gallery.sql.SQLStore`'s transactions
    (mixed into it)."""

    if TYPE_CHECKING:  # provided by SQLStore

        def _read(self) -> AbstractContextManager[Cursor]: ...
        def _notify(self, cur: Cursor, seq: int) -> None: ...

    def _log(
        self, cur: Cursor, gallery: str, op: str, face_id: int | None, subject_id: str | None
    ) -> int:
        seq = self._append(cur, gallery, op, face_id, subject_id)
        if cur.changes is not None:
            cur.changes.append((face_id, subject_id))
        return seq

    def _append(
        self, cur: Cursor, gallery: str, op: str, face_id: int | None, subject_id: str | None
    ) -> int:
        """Append one entry (and announce it); :meth:`_log` also counts it among the
        transaction's index changes (``cur.changes``, which its audit row lists)."""
        seq = int(
            cur.execute("UPDATE log_head SET seq = seq + 1 WHERE id = 1 RETURNING seq").fetchone()[
                0
            ]
        )
        cur.execute(
            "INSERT INTO changes (seq, gallery, op, face_id, subject_id, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (seq, gallery, op, face_id, subject_id, time.time()),
        )
        self._notify(cur, seq)
        return seq

    def head_seq(self) -> int:
        with self._read() as cur:
            return int(cur.execute("SELECT seq FROM log_head WHERE id = 1").fetchone()[0])

    def changes_after(self, seq: int, limit: int = 1000, upto: int | None = None) -> list[Change]:
        sql = (
            "SELECT c.seq, c.gallery, c.op, c.face_id, c.subject_id, f.embedding, g.model_id, "
            "g.dim "
            "FROM changes c "
            "LEFT JOIN faces f ON c.op = 'add' AND f.face_id = c.face_id "
            "LEFT JOIN galleries g ON c.op = 'add' AND g.name = c.gallery "
            "WHERE c.seq > ?"
        )
        params: list = [int(seq)]
        if upto is not None:
            sql += " AND c.seq <= ?"
            params.append(int(upto))
        sql += " ORDER BY c.seq LIMIT ?"
        params.append(int(limit))
        with self._read() as cur:
            rows = cur.execute(sql, params).all_named()
        return [Change.from_row(row) for row in rows]
