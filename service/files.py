"""Atomic, durable file writes: the one way the project replaces a file.

A reader sees the old file or the new one, never a part, and once the call returns the
new one survives a crash or power loss: the data goes to a temporary file beside the
target, which is flushed and fsynced, renamed over the target, and then the folder is
fsynced (so the rename itself is on disk).  A failed write leaves the target as it was
and removes the temporary file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (a no-op where folders cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: Path, target: Path) -> None:
    """Rename the finished file ``tmp`` (already fsynced, or written by a library that
    closes it) over ``target``, fsyncing ``tmp`` first and the folder after."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    fsync_dir(Path(target).resolve().parent)


@contextmanager
def atomic_file(
    target: Path, *, suffix: str = ".tmp", mode: int | None = None
) -> Iterator[BinaryIO]:
    """A binary file to write ``target``'s new content into; on a clean exit it replaces
    ``target`` durably (``mode``: the file's permissions, set before it is visible)."""
    target = Path(target)
    tmp = target.with_name(target.name + suffix)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.resolve().parent)


def atomic_write(
    target: Path, data: bytes | str, *, suffix: str = ".tmp", mode: int | None = None
) -> None:
    """Replace ``target`` with ``data`` (text is written as UTF-8) atomically and durably."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(target, suffix=suffix, mode=mode) as fh:
        fh.write(payload)
