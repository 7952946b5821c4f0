"""One index's snapshot files: the serialised index, its ivf accelerator and a JSON sidecar
with the format, the index kind and the files' checksums.  :mod:`service.gallery.index`
writes and reads its own files through this module; :mod:`service.gallery.snapshots`
groups them into one set per store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from service.files import atomic_write

SNAPSHOT_FORMAT = 2  # 2: the exact index in .faiss, the ivf accelerator (if any) in .ivf


class SnapshotError(RuntimeError):
    """A snapshot is missing, corrupt, or does not fit this configuration."""


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
