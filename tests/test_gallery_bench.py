"""``bench/bench_search.py --quick`` runs and reports sane figures in its last line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.timeout(300)
def test_search_benchmark_quick_mode():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_search.py"), "--quick"],
                          capture_output=True, text=True, cwd=REPO, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {(r["kind"], r["size"]): r for r in report["results"]}
    dim = report["dim"]
    n = max(size for _, size in rows)
    assert {kind for kind, _ in rows} == {"flat", "ivf", "hnsw", "ivfpq"}
    for row in rows.values():
        assert 0 < row["p50_ms"] <= row["p99_ms"], row
        assert 0.0 <= row["recall_at_1"] <= 1.0
    flat = rows[("flat", n)]
    assert flat["recall_at_1"] == 1.0  # exact search finds the true nearest face
    assert rows[("ivf", n)]["recall_at_1"] >= 0.8
    assert rows[("hnsw", n)]["recall_at_1"] >= 0.8
    # Memory: flat stores the raw float32 vector (+ its id); HNSW adds graph links; PQ compresses.
    assert dim * 4 <= flat["bytes_per_vector"] <= dim * 4 + 16
    assert rows[("hnsw", n)]["bytes_per_vector"] > flat["bytes_per_vector"]
    assert rows[("ivfpq", n)]["bytes_per_vector"] < flat["bytes_per_vector"] / 4
    assert set(report["memory_per_million"]) == {"flat", "ivf", "hnsw", "ivfpq"}
