"""``bench/bench_load.py --quick`` runs against real servers and ends with one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.support.service import TEST_MODELS


@pytest.mark.timeout(300)
def test_bench_load_quick():
    env = {**os.environ, **TEST_MODELS}
    proc = subprocess.run(
        [sys.executable, "bench/bench_load.py", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["modes"]) == {"on", "off"}
    for mode in result["modes"].values():
        assert mode["enrolled"] >= 3
        for key in ("verify@1", "verify@4", "identify@1", "identify@4"):
            level = mode["levels"][key]
            assert level["requests"] > 0 and level["errors"] == {}, (key, level)
            assert 0 < level["p50_ms"] <= level["p99_ms"]
    soak = result["modes"]["on"]["soak"]
    assert soak["rss_start_mb"] > 0 and soak["rss_end_mb"] > 0 and soak["errors"] == {}
