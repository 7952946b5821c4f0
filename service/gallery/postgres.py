"""The PostgreSQL store backend, for several replicas sharing one gallery.

Connections come from a ``psycopg_pool.ConnectionPool``.  Every write
transaction first locks the single ``log_head`` row (``SELECT ... FOR UPDATE``),
which serialises writers, keeps change-log sequence numbers gap-free and in
commit order, and rules out deadlocks between writers (they all take that lock
first).  Each logged write also calls ``pg_notify`` in its transaction, so the
notification is delivered exactly when the write commits; followers ``LISTEN``
on one dedicated connection and fall back to polling if it breaks.

Durability is PostgreSQL's: a ``COMMIT`` that returned is in the WAL on disk
(with the server's default ``synchronous_commit=on``).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import psycopg
from psycopg_pool import ConnectionPool

from service.gallery.sql import Cursor, SQLStore

log = logging.getLogger(__name__)

CHANNEL = "facegate_gallery_changes"
STOP_CHECK_S = 0.2
LISTEN_CONNECT_TIMEOUT_S = 5  # an unreachable server must not hold the follower for minutes
MIGRATION_LOCK = 0x6661636567617465  # pg_advisory_xact_lock key for migrations


class PostgresStore(SQLStore):
    """A gallery store in a PostgreSQL database."""

    backend = "postgresql"
    dialect = "postgresql"

    def __init__(self, url: str, pool_size: int = 8) -> None:
        self.url = url
        self.pool_size = pool_size
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self._listener: psycopg.Connection | None = None

    def _connections(self) -> ConnectionPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    kwargs={"autocommit": True},
                    open=True,
                    name="facegate-gallery",
                )
                self._pool.wait(timeout=30)
            return self._pool

    @contextmanager
    def _transaction(self, first: str | None = None):
        with self._connections().connection() as conn, conn.transaction():
            cur = Cursor(conn.cursor(), qmark=False)
            if first:
                cur.execute(first)
            yield cur

    def _write_tx(self):
        return self._transaction("SELECT seq FROM log_head WHERE id = 1 FOR UPDATE")

    def _read(self):
        return self._transaction("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _ddl(self):
        return self._transaction(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")

    def _notify(self, cur: Cursor, seq: int) -> None:
        cur.execute("SELECT pg_notify(?, ?)", (CHANNEL, str(seq)))

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        """Return on a ``NOTIFY`` from any writer, after ``timeout``, or soon after ``stop``."""
        try:
            if self._listener is None or self._listener.closed:
                self._listener = psycopg.connect(
                    self.url, autocommit=True, connect_timeout=LISTEN_CONNECT_TIMEOUT_S
                )
                self._listener.execute(f"LISTEN {CHANNEL}")
            deadline = time.monotonic() + timeout
            while not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                # Short slices, so that stop() is noticed even with a long poll interval.
                for _ in self._listener.notifies(
                    timeout=min(remaining, STOP_CHECK_S), stop_after=1
                ):
                    return
        except psycopg.Error as exc:
            log.warning("gallery LISTEN connection failed (%s); polling", exc)
            if self._listener is not None:
                self._listener.close()
            self._listener = None
            stop.wait(timeout)

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
