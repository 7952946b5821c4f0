"""FAISS index snapshots: one set per store, written when a service stops and read when
one starts (:class:`~service.gallery.service.GalleryService` then catches the set up from
the change log and verifies it against the store before using it).

A set is one file group per gallery (:func:`write_index_files`: the index, the ivf
accelerator if any, and a JSON sidecar with its seq, gallery name and checksums) and
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
from typing import TYPE_CHECKING, Any

from service.files import atomic_write

if TYPE_CHECKING:  # the index module reads and writes its files through this one
    from service.gallery.index import GalleryIndex, IndexSettings

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 2  # 2: the exact index in .faiss, the ivf accelerator (if any) in .ivf


class SnapshotError(RuntimeError):
    """A snapshot is missing, corrupt, or does not fit this configuration."""


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


def write_index_files(
    prefix: Path, data: bytes, accelerator: bytes | None, fields: dict[str, Any]
) -> None:
    """Write one index's snapshot: ``<prefix>.faiss`` (the serialised exact or HNSW
    index), ``<prefix>.ivf`` (the serialised accelerator, if any; a stale one is removed)
    and the sidecar ``<prefix>.json`` (``fields`` plus the format and the files' sha256).

    Each is written atomically; the sidecar, which carries the checksums, is written last
    and so marks a complete snapshot."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {
        "format": SNAPSHOT_FORMAT,
        **fields,
        "sha256": hashlib.sha256(data).hexdigest(),
        "ivf_sha256": accelerator and hashlib.sha256(accelerator).hexdigest(),
    }
    files = [(".faiss", data), (".json", json.dumps(sidecar).encode())]
    if accelerator is not None:
        files.insert(1, (".ivf", accelerator))
    else:
        prefix.with_suffix(".ivf").unlink(missing_ok=True)
    for suffix, payload in files:
        atomic_write(prefix.with_suffix(suffix), payload)


def read_index_files(prefix: Path, kind: str) -> tuple[dict[str, Any], bytes, bytes | None]:
    """(sidecar, index bytes, accelerator bytes or None) of the snapshot at ``prefix``,
    checked for this format, index type ``kind`` and the checksums; else
    :class:`SnapshotError`."""
    try:
        sidecar = json.loads(prefix.with_suffix(".json").read_text())
        data = prefix.with_suffix(".faiss").read_bytes()
        accelerator = prefix.with_suffix(".ivf").read_bytes() if sidecar.get("ivf_sha256") else None
    except (OSError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"cannot read snapshot {prefix}: {exc}") from None
    if sidecar.get("format") != SNAPSHOT_FORMAT or sidecar.get("kind") != kind:
        raise SnapshotError(f"snapshot {prefix} has another format or index type")
    if hashlib.sha256(data).hexdigest() != sidecar.get("sha256") or (
        accelerator is not None
        and hashlib.sha256(accelerator).hexdigest() != sidecar.get("ivf_sha256")
    ):
        raise SnapshotError(f"snapshot {prefix} does not match its checksum")
    return sidecar, data, accelerator
