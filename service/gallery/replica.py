"""This process's replica of the galleries: one FAISS index per gallery, the change-log
position it reflects, and the follower that keeps it there.

The indexes are derived state: built from the store (:meth:`Replica.rebuild`) or loaded
from a verified snapshot, then kept fresh by applying the store's change log strictly in
``seq`` order, once per entry, under one lock shared by both paths:

* a write made through this process is applied at once (:meth:`Replica.apply_own`), so it
  is visible to searches here before the write returns;
* the follower (:meth:`Replica.follow`) applies everybody else's entries: it wakes every
  ``settings.sync_interval_s`` (and at once on a PostgreSQL ``NOTIFY``), reads the store's
  head and applies every entry after ``applied_seq`` (:meth:`Replica.catch_up`, a *sync*).

The log is gap-free by construction, so a gap means it was tampered with: the replica logs
it and rebuilds every index from the store rather than skipping anything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from service.gallery.consistency import compare_gallery
from service.gallery.index import GalleryIndex, IndexSettings
from service.gallery.store import Change, GalleryStore

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger(__name__)

LOG_BATCH = 1000


class LogGap(RuntimeError):
    """The change log skipped a sequence number."""


class Replica:
    """The indexes, ``applied_seq`` and sync bookkeeping of one process."""

    def __init__(self, settings: Settings, gpu: bool, store: Callable[[], GalleryStore]) -> None:
        self.settings = settings
        self.gpu = gpu
        #: How this replica's indexes are built and loaded.
        self.index_settings = IndexSettings.from_settings(settings, gpu)
        self._store = store
        self.indexes: dict[str, GalleryIndex] = {}
        self.lock = threading.RLock()  # held while applying the log or reading it whole
        self.applied_seq = 0
        self.head_seen = 0  # the store's head as last read by a sync
        self.synced_at: float | None = None  # monotonic time the last successful sync began
        self.sync_error: str | None = None  # why the last sync failed (None: it succeeded)

    @property
    def store(self) -> GalleryStore:
        return self._store()

    def new_index(self, dim: int, model_id: str) -> GalleryIndex:
        return self.index_settings.build(dim, model_id)

    # --- applying the change log ------------------------------------------------
    def apply(self, change: Change) -> None:
        """Apply one log entry to the indexes (caller holds the lock)."""
        name = change.gallery
        if change.op == "add":
            if change.embedding is None:
                return  # deleted again by a later entry
            assert change.dim and change.model_id and change.subject_id is not None
            index = self.indexes.get(name)
            if index is None:
                index = self.new_index(change.dim, change.model_id)
                self.indexes[name] = index
            index.add([change.face_id], [change.subject_id], change.embedding[None, :])
        elif change.op == "delete_face":
            if name in self.indexes:
                self.indexes[name].remove([change.face_id])
        elif change.op == "delete_subject":
            if name in self.indexes and change.subject_id is not None:
                self.indexes[name].remove_subject(change.subject_id)
        elif change.op == "delete_gallery":
            self.indexes.pop(name, None)
        elif change.op == "people":
            pass  # a people-discovery write: photos and clusters are read from the store
        else:
            raise ValueError(f"unknown change-log op {change.op!r} at seq {change.seq}")

    def apply_own(self, change: Change) -> None:
        """Apply a write this process just committed (and anything before it first)."""
        with self.lock:
            if self.applied_seq >= change.seq:
                return
            if self.applied_seq == change.seq - 1:
                self.apply(change)
                self.applied_seq = change.seq
            else:
                self.catch_up_to(change.seq)

    def catch_up(self) -> int:
        """Sync: read the store's head, apply every committed entry not applied yet (at
        least up to that head); return the new ``applied_seq``.  A failure is recorded
        (the replica is not ready until a sync succeeds) and raised."""
        began = time.monotonic()
        try:
            head = self.store.head_seq()
            self.head_seen = max(self.head_seen, head)
            with self.lock:
                self.catch_up_to()
                applied = self.applied_seq
        except Exception as exc:
            self.sync_error = f"{type(exc).__name__}: {exc}".strip()[:300]
            raise
        self.record_sync(began, head)
        return applied

    def catch_up_to(self, upto: int | None = None) -> None:
        """Apply the log after ``applied_seq`` (up to ``upto``); caller holds the lock."""
        try:
            while True:
                changes = self.store.changes_after(self.applied_seq, LOG_BATCH, upto)
                for change in changes:
                    if change.seq != self.applied_seq + 1:
                        raise LogGap(
                            f"change log jumps from seq {self.applied_seq} to {change.seq}"
                        )
                    self.apply(change)
                    self.applied_seq = change.seq
                if len(changes) < LOG_BATCH:
                    return
        except LogGap:
            log.exception("gallery change log has a gap; rebuilding every index from the store")
            self.rebuild()

    def rebuild(self) -> None:
        """Build every index from the store, in one consistent read."""
        head, galleries = self.store.load_all()
        indexes = {}
        for gallery in galleries:
            if gallery.dim is None:
                continue  # no face ever added: nothing to index yet
            index = self.new_index(gallery.dim, gallery.model_id)
            if len(gallery.face_ids):
                index.add(gallery.face_ids, gallery.subject_ids, gallery.embeddings)
            indexes[gallery.name] = index
        self.indexes = indexes
        self.applied_seq = head
        log.info(
            "gallery indexes built from the store at seq %d (%d galleries)", head, len(indexes)
        )

    def record_sync(self, began: float, head: int) -> None:
        """A sync that began at ``began`` read ``head`` and has applied everything up to it."""
        self.head_seen = max(self.head_seen, head)
        if self.sync_error is not None:
            log.info("gallery sync with the store succeeded again at seq %d", head)
        self.synced_at, self.sync_error = began, None

    def follow(self, stop: threading.Event) -> None:
        """The follower's loop (its own thread), until ``stop`` is set."""
        interval = float(self.settings.sync_interval_s)
        failing = False
        while not stop.is_set():
            try:
                self.store.wait_for_change(interval, stop)
                if stop.is_set():
                    return
                self.catch_up()
                failing = False
            except Exception:
                if failing:  # the first failure of a run has the traceback, the rest one line
                    log.warning(
                        "gallery sync with the store failed again (%s); retrying", self.sync_error
                    )
                else:
                    log.exception("gallery change-log follower failed; retrying")
                failing = True
                stop.wait(interval)

    # --- state ------------------------------------------------------------------
    def sync_status(self, running: bool) -> dict:
        """The replication state from this replica's own bookkeeping (no store round trip,
        so it answers at once even while the store does not); ``running``: the follower
        runs.  See ``GalleryService.sync_status``."""
        applied = self.applied_seq
        head = max(self.head_seen, applied)
        synced_at, error = self.synced_at, self.sync_error
        age = None if synced_at is None else round(time.monotonic() - synced_at, 3)
        limit = self.settings.sync_unready_after_s
        if not running:
            reason = (
                "the change-log follower is not running"
                if self.synced_at is not None
                else "the gallery index is not built yet"
            )
        elif error is not None:
            reason = f"the last sync with the store failed ({error})"
        elif age is None or age > limit:
            reason = f"no successful sync with the store for {age} s (limit {limit} s)"
        else:
            reason = None
        status: dict[str, object] = {
            "ready": reason is None,
            "applied_seq": applied,
            "head_seq": head,
            "lag": head - applied,
            "last_synced_age_s": age,
            "fresh": age is not None and age <= self.settings.sync_bound_s,
        }
        if reason is not None:
            status["reason"] = reason
        return status

    def compare(
        self, stored: dict[str, tuple[np.ndarray, list[str]]], examples: int = 5
    ) -> list[dict]:
        """:func:`compare_gallery` for every gallery of the store (``index_contents``) or of
        this replica (caller holds the lock)."""
        found = []
        for name in sorted(set(stored) | set(self.indexes)):
            face_ids, subject_ids = stored.get(name, (np.zeros(0, np.int64), []))
            found.append(
                compare_gallery(
                    name, self.indexes.get(name), face_ids, subject_ids, examples=examples
                )
            )
        return found
