"""``service.files``: a file is replaced whole or not at all, with its permissions."""

from __future__ import annotations

import stat

import pytest

from service.files import atomic_file, atomic_write


def test_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    atomic_write(target, '{"seq": 2}')
    assert target.read_text() == '{"seq": 2}'
    atomic_write(target, b"\x00\x01", mode=0o600)
    assert target.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no temporary left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "export.jsonl"
    target.write_bytes(b"complete")
    with pytest.raises(RuntimeError), atomic_file(target, suffix=".partial") as out:
        out.write(b"half")
        raise RuntimeError("the export failed midway")
    assert target.read_bytes() == b"complete"
    assert not (tmp_path / "export.jsonl.partial").exists()
