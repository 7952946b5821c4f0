"""The pipeline benchmark runs in quick mode and reports a sane comparison."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.timeout(300)
def test_bench_pipeline_quick():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_pipeline.py"), "--quick"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ours_images_per_s"] > 0 and report["insightface_images_per_s"] > 0
    assert report["ratio"] == pytest.approx(
        report["ours_images_per_s"] / report["insightface_images_per_s"], rel=1e-2
    )
    # Both paths find the same faces on the same images.
    assert report["faces"]["ours"] == report["faces"]["insightface"] >= 10
    for side in ("ours", "insightface"):
        assert report[f"{side}_faces_per_s"] == pytest.approx(
            report[f"{side}_images_per_s"] * report["faces"][side] / report["images"], rel=1e-2
        )
    # Same run, same answer: every image has as many faces on both paths, every face pairs
    # with one of InsightFace's, and the two embeddings of a face agree (the landmarks differ
    # slightly because the detector runs at another input size).
    same = report["agreement"]
    assert same["images_with_equal_face_count"] == report["images"]
    assert same["faces_paired"] == report["faces"]["ours"] and same["faces_unpaired"] == 0
    assert 0.9 <= same["embedding_cosine_min"] <= same["embedding_cosine_median"] <= 1.0
    assert same["embedding_cosine_median"] >= 0.95
    # Detecting at the photo's own size instead of 640x640 is the main saving; even on a
    # busy machine it keeps ours clearly ahead.
    assert report["ratio"] > 1.3
