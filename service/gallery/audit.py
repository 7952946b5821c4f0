"""The audit log: who enrolled, deleted, searched or exported what, and when.

An :class:`AuditEntry` holds the time, the API key id (``anonymous`` on an open service,
``cli`` for commands on the store), the client address, the action, the gallery, the
subject and face ids touched or returned, and the result code (``ok`` or the error code).
Never a photo, never an embedding.

Two ways into the ``audit`` table:

* **writes** that change a gallery: the front end makes the request's entry *current*
  (:func:`recording`); every store write transaction that appends change-log entries while
  an entry is current inserts one audit row with the face and subject ids of those
  changes, **in the same transaction** (:meth:`service.gallery.sql.SQLStore._write`), so
  an acknowledged change always has its audit row and a rolled-back one never has;
* everything else (searches, exports, refused requests): :class:`AuditWriter` queues the
  entry and a background thread appends queued entries in batches, so a search does not
  wait for a store write; the writer commits at most every ``FLUSH_S`` (one fsync per batch).

A refusal (action ``refused``) names the ``route`` it was refused on and the ``reason``.
Refusals of callers without a valid key (``anonymous``, ``invalid_key``) are throttled per
client address (:meth:`AuditWriter.record` with ``throttle=``): the first ``THROTTLE_BURST``
of a client in each ``THROTTLE_WINDOW_S`` are recorded one by one, the rest of that window
are counted and written as **one** record when the window ends (its ``reason`` says how
many and ends with the last one's reason), so a flood of bad keys costs at most
``THROTTLE_BURST + 1`` records per client and window (and at most ``THROTTLE_CLIENTS``
clients are told apart; beyond that they share one allowance).

The writer thread also enforces the retention (``FACEGATE_AUDIT_RETENTION_DAYS``): rows
older than that are deleted at start and then hourly.  Deleting a subject keeps its audit
rows (they hold ids only).
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

ACTIONS = (
    "enrol",
    "reenrol",
    "import",
    "restore",
    "delete_face",
    "delete_subject",
    "delete_gallery",
    "identify",
    "verify",
    "export",
    "refused",
    "add_photo",
    "cluster",
    "name_cluster",
    "merge_clusters",
    "move_face",
    "remove_face",
    "split_cluster",
)
FLUSH_S = 0.5  # the writer commits at most this often (one fsync per batch)
BATCH = 500
PRUNE_EVERY_S = 3600.0
THROTTLE_WINDOW_S = 60.0
THROTTLE_BURST = 10
THROTTLE_CLIENTS = 4096


class AuditLog(Protocol):
    """Where the writer appends entries: the store (``GalleryStore.append_audit`` /
    ``prune_audit``); named here so that the audit log and the store do not import each
    other."""

    def append_audit(self, entries: list[AuditEntry]) -> None: ...

    def prune_audit(self, before: float) -> int: ...


_current: contextvars.ContextVar[AuditEntry | None] = contextvars.ContextVar(
    "facegate_audit_entry", default=None
)


@dataclass
class AuditEntry:
    action: str
    key_id: str = "anonymous"
    client: str | None = None
    gallery: str | None = None
    subject_ids: list[str] = field(default_factory=list)
    face_ids: list[int] = field(default_factory=list)
    result: str = "ok"
    at: float = field(default_factory=time.time)
    written: bool = False  # a store transaction already wrote a row for it
    route: str | None = None  # "METHOD /path/{template}" (refusals)
    reason: str | None = None  # why it was refused

    def add(self, subject_ids=(), face_ids=()) -> None:
        for subject_id in subject_ids:
            if subject_id is not None and subject_id not in self.subject_ids:
                self.subject_ids.append(subject_id)
        for face_id in face_ids:
            if face_id is not None and int(face_id) not in self.face_ids:
                self.face_ids.append(int(face_id))


def current() -> AuditEntry | None:
    """The entry of the request (or command) being served in this context, if any."""
    return _current.get()


def begin(entry: AuditEntry) -> AuditEntry:
    """Make ``entry`` current for the rest of this context (one request's task)."""
    _current.set(entry)
    return entry


@contextmanager
def recording(entry: AuditEntry) -> Iterator[AuditEntry]:
    """Make ``entry`` current while the block runs (and in threads it starts with this
    context, as ``anyio.to_thread`` does)."""
    token = _current.set(entry)
    try:
        yield entry
    finally:
        _current.reset(token)


class AuditWriter:
    """Appends entries to the store in the background, and prunes old rows."""

    def __init__(self, store: AuditLog, retention_days: float = 0.0) -> None:
        self.store = store
        self.retention_s = float(retention_days) * 86400.0
        self._queue: queue.Queue[AuditEntry | _Marker | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._pruned_at: float | None = None  # never yet: prune at start
        self._wake = threading.Event()  # flush() and close() cut the wait between batches
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}  # throttled clients' current windows
        self._thread.start()

    def record(self, entry: AuditEntry, throttle: str | None = None) -> None:
        """Queue ``entry`` (returns at once).  ``throttle``: the client it counts against
        (see the module docstring); past its allowance it is only counted."""
        if throttle is None:
            self._queue.put(entry)
            return
        now = time.monotonic()
        with self._lock:
            self._close_windows(now)
            if throttle not in self._windows and len(self._windows) >= THROTTLE_CLIENTS:
                throttle = "*"
            window = self._windows.setdefault(throttle, _Window(now))
            if window.recorded < THROTTLE_BURST:
                window.recorded += 1
                self._queue.put(entry)
            else:
                window.suppressed += 1
                window.last = entry

    def _close_windows(self, now: float, every: bool = False) -> None:
        """Queue one summary record per ended window that counted refusals (lock held)."""
        for client, window in list(self._windows.items()):
            if every or now - window.start >= THROTTLE_WINDOW_S:
                del self._windows[client]
                if window.last is not None:
                    last = window.last
                    last.reason = (
                        f"{window.suppressed} refusals from this client within "
                        f"{THROTTLE_WINDOW_S:g} s past the first {THROTTLE_BURST}, "
                        f"recorded as this one record; the last: {last.reason}"
                    )
                    self._queue.put(last)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every entry queued so far is in the store."""
        with self._lock:
            self._close_windows(time.monotonic())
        done = threading.Event()
        self._queue.put(_Marker(done))
        self._wake.set()
        done.wait(timeout)

    def close(self) -> None:
        with self._lock:
            self._close_windows(time.monotonic(), every=True)
        self._queue.put(None)
        self._wake.set()
        self._thread.join(timeout=15)

    def prune(self) -> int:
        if self.retention_s <= 0:
            return 0
        removed = self.store.prune_audit(time.time() - self.retention_s)
        self._pruned_at = time.monotonic()
        if removed:
            log.info("audit log: removed %d records older than the retention", removed)
        return removed

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                if self._pruned_at is None or time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                    self.prune()
            except Exception:
                log.exception("audit log pruning failed")
            batch: list[AuditEntry] = []
            markers = []
            with self._lock:
                self._close_windows(time.monotonic())
            try:
                item = self._queue.get(timeout=FLUSH_S)
            except queue.Empty:
                continue
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, _Marker):
                    markers.append(item)
                else:
                    batch.append(item)
                if len(batch) >= BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self.store.append_audit(batch)
                except Exception:
                    log.exception("audit log: could not write %d records", len(batch))
            for marker in markers:
                marker.done.set()
            if batch and not stop:  # let the next batch gather: one commit per FLUSH_S
                self._wake.wait(FLUSH_S)
                self._wake.clear()


@dataclass
class _Window:
    start: float
    recorded: int = 0
    suppressed: int = 0
    last: AuditEntry | None = None


@dataclass
class _Marker:
    done: threading.Event
