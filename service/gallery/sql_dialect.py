"""The SQL dialect shim shared by both backends: a cursor that takes ``?`` placeholders
everywhere (the PostgreSQL backend's driver wants ``%s``) and reads rows by column name."""

from __future__ import annotations

from typing import Any

#: A row as a dict of its columns by name (:meth:`Cursor.named` / :meth:`Cursor.all_named`).
Row = dict[str, Any]


class Cursor:
    """A DB-API cursor that takes ``?`` placeholders on every backend."""

    def __init__(self, cursor, qmark: bool) -> None:
        self._cursor = cursor
        self._qmark = qmark
        #: (face_id, subject_id) of the change-log entries of this write transaction
        self.changes: list[tuple[int | None, str | None]] | None = None

    def execute(self, sql: str, params: tuple | list = ()) -> Cursor:
        if not self._qmark:
            sql = sql.replace("?", "%s")
        self._cursor.execute(sql, tuple(params))
        return self

    def fetchone(self):
        return self._cursor.fetchone()

    def fetchall(self):
        return self._cursor.fetchall()

    def fetchmany(self, size: int):
        return self._cursor.fetchmany(size)

    def _names(self) -> list[str]:
        return [column[0] for column in self._cursor.description]

    def named(self) -> Row | None:
        """The next row as a dict by column name (None when there is none)."""
        row = self._cursor.fetchone()
        return None if row is None else dict(zip(self._names(), row, strict=True))

    def all_named(self) -> list[Row]:
        """Every remaining row as a dict by column name."""
        names = self._names()
        return [dict(zip(names, row, strict=True)) for row in self._cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount
