"""FAISS index snapshots: one set per store, written when a service stops and read when
one starts (:class:`~service.gallery.service.GalleryService` then catches the set up from
the change log and verifies it against the store before using it).

A set is one file group per gallery (written by
:func:`~service.gallery.snapshot_files.write_index_files`: the index, the ivf accelerator
if any, and a JSON sidecar with its seq, gallery name and checksums) and
``manifest.json``, written last and atomically, naming the set and the seq it reflects.
Services sharing the data dir (``serve --workers N`` stops N at once) write one whole set
at a time, under an exclusive lock on ``<snapshot dir>/lock``: the last one wins.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.files import atomic_write
from service.gallery.index import GalleryIndex, IndexSettings
from service.gallery.snapshot_files import SNAPSHOT_FORMAT, SnapshotError

log = logging.getLogger(__name__)

__all__ = ["SNAPSHOT_FORMAT", "SnapshotError", "Snapshots", "exclusive"]


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on ``path``, between processes and threads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Snapshots:
    """The snapshot set of one store (by URL) under ``data_dir``."""

    def __init__(self, data_dir: Path, store_url: str, index: IndexSettings) -> None:
        digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
        self.directory = Path(data_dir) / "snapshots" / digest
        self.index = index
        self.index_type = index.kind

    def _prefix(self, name: str) -> Path:
        return self.directory / hashlib.sha256(name.encode()).hexdigest()[:24]

    def write(self, indexes: dict[str, GalleryIndex], seq: int) -> None:
        """Write every index as reflecting ``seq``, then the manifest (atomically).  The
        caller keeps ``indexes`` still meanwhile."""
        with exclusive(self.directory / "lock"):
            files = {}
            for name, index in indexes.items():
                index.save(self._prefix(name), seq, name)
                files[name] = self._prefix(name).name
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(
                self.directory / "manifest.json",
                json.dumps({"seq": seq, "index_type": self.index_type, "galleries": files}),
            )

    def read(self, head_seq: int) -> tuple[dict[str, GalleryIndex], int] | None:
        """The set's indexes and seq, or None (logged) when there is none or it cannot be
        used: another index type, a seq ahead of the store's log ``head_seq``, a file that
        is unreadable or belongs to another set."""
        manifest = self.directory / "manifest.json"
        if not manifest.is_file():
            return None
        try:
            spec = json.loads(manifest.read_text())
            seq = int(spec["seq"])
            if spec.get("index_type") != self.index_type:
                raise SnapshotError("snapshot was written for another index type")
            if seq > head_seq:
                raise SnapshotError(f"snapshot seq {seq} is ahead of the store's log")
            indexes = {}
            for name, prefix in spec["galleries"].items():
                index, sidecar = self.index.load(self.directory / prefix)
                if sidecar["seq"] != seq or sidecar["gallery"] != name:
                    raise SnapshotError(f"snapshot of {name!r} does not belong to this set")
                indexes[name] = index
        except (SnapshotError, KeyError, ValueError, TypeError) as exc:
            log.warning("ignoring gallery snapshot: %s", exc)
            return None
        return indexes, seq
