"""The default decode budget: sized from the memory the process may use, per worker.

The cgroup files are written here in the kernel's formats (v2 ``memory.max``: a number or
``max``; v1 ``memory.limit_in_bytes``: a number, 2**63 rounded down to a page meaning no
limit), so the reader is checked against the format, not against itself.
"""

from __future__ import annotations

import os

import pytest

from service import config
from service.config import (
    DECODE_BUDGET_MAX,
    DECODE_BUDGET_MIN,
    DECODE_PEAK_FACTOR,
    WORKER_BASE_BYTES,
    Settings,
    default_decode_budget,
    memory_limit_bytes,
)

GIB = 1024**3
HOST = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_limits_are_read_in_both_versions(tmp_path):
    none = tmp_path / "none"
    none.mkdir()
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    assert memory_limit_bytes(none, proc) == HOST  # no cgroup: the host's memory
    v2 = tmp_path / "v2"
    write(v2 / "memory.max", "max")
    assert memory_limit_bytes(v2, proc) == HOST
    write(v2 / "memory.max", str(2 * GIB))
    assert memory_limit_bytes(v2, proc) == 2 * GIB
    v1 = tmp_path / "v1"
    write(v1 / "memory" / "memory.limit_in_bytes", "9223372036854771712")  # no limit
    assert memory_limit_bytes(v1, proc) == HOST
    write(v1 / "memory" / "memory.limit_in_bytes", str(GIB))
    assert memory_limit_bytes(v1, proc) == GIB
    # the process's own cgroup (below the mount's root), the smallest limit found
    nested = tmp_path / "nested"
    write(nested / "memory.max", "max")
    write(nested / "pods" / "p1" / "memory.max", str(3 * GIB))
    write(nested / "memory" / "docker" / "c1" / "memory.limit_in_bytes", str(5 * GIB))
    proc.write_text("4:memory:/docker/c1\n0::/pods/p1\n")
    assert memory_limit_bytes(nested, proc) == 3 * GIB


def test_the_budget_keeps_each_workers_peak_within_its_share():
    for memory, workers in ((2 * GIB, 2), (4 * GIB, 1), (8 * GIB, 4), (16 * GIB, 8)):
        budget = default_decode_budget(workers, memory)
        assert DECODE_BUDGET_MIN <= budget <= DECODE_BUDGET_MAX
        peak = WORKER_BASE_BYTES + DECODE_PEAK_FACTOR * budget  # README's formula
        assert peak <= memory / workers + 1, (memory, workers)
    assert default_decode_budget(2, 2 * GIB) == int((GIB - WORKER_BASE_BYTES) / 1.25)
    assert default_decode_budget(1, 64 * GIB) == DECODE_BUDGET_MAX  # as before on big hosts
    assert default_decode_budget(4, GIB) == DECODE_BUDGET_MIN  # too little: the floor


def test_settings_default_from_the_limit_and_workers(monkeypatch):
    monkeypatch.setattr(config, "memory_limit_bytes", lambda: 2 * GIB)
    for name in ("FACEGATE_DECODE_BUDGET_BYTES", "FACEGATE_MAX_DECODE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    one, two = Settings(workers=1), Settings(workers=2)
    assert one.decode_budget_bytes == default_decode_budget(1, 2 * GIB)
    assert two.decode_budget_bytes == default_decode_budget(2, 2 * GIB) < one.decode_budget_bytes
    small = Settings(workers=8)
    assert small.max_decode_bytes <= small.decode_budget_bytes  # one image still fits
    assert Settings(decode_budget_bytes=GIB).decode_budget_bytes == GIB  # explicit wins
    with pytest.raises(ValueError, match="FACEGATE_MAX_DECODE_BYTES"):
        Settings(decode_budget_bytes=100 * 1024**2, max_decode_bytes=200 * 1024**2)
