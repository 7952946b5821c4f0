"""The SQLite store backend (the default): one file in ``settings.data_dir``.

Durability: the database runs in WAL mode with ``synchronous=FULL``, so every
``COMMIT`` fsyncs the write-ahead log before it returns.  An acknowledged write
therefore survives ``kill -9`` of the process (the WAL is in the OS page cache
even without fsync) and also an OS crash or power loss (it is on disk).
``NORMAL`` would only guarantee the former.

Concurrency: one writer connection guarded by a lock (writes additionally use
``BEGIN IMMEDIATE``, so several processes on one file also serialise, waiting
up to ``busy_timeout``), and one reader connection per thread; WAL lets readers
proceed while a write is in progress, each reading a consistent snapshot.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from service.gallery.sql import Cursor, SQLStore

BUSY_TIMEOUT_MS = 30_000


class SQLiteStore(SQLStore):
    """A gallery store in one SQLite file."""

    backend = "sqlite"
    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("the gallery store is closed")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return conn

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection, begin: str):
        conn.execute(begin)
        try:
            yield Cursor(conn.cursor(), qmark=True)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _write_tx(self):
        with self._write_lock:
            if self._writer is None:
                self._writer = self._connect()
            with self._transaction(self._writer, "BEGIN IMMEDIATE") as cur:
                yield cur

    _ddl = _write_tx

    @contextmanager
    def _read(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        with self._transaction(conn, "BEGIN") as cur:
            yield cur

    def close(self) -> None:
        self._closed = True
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
