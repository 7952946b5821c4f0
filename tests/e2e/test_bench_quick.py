"""``--quick`` runs of the benchmarks without a test of their own: each runs as a script (the
real entry point, on CPU) and its last output line is one JSON object with sane figures.

- ``bench/bench_batching.py``: micro-batching on/off with the default models;
- ``bench/bench_mtcnn.py``: our MTCNN against facenet-pytorch's (from its wheel, needs torch);
- ``bench/dlib_resnet_speed.py``: the converted dlib ResNet against dlib-bin (dev extra);
- ``bench/derive_dlib_template.py``: dlib_resnet_v1's alignment template, measured again;
- ``bench/loss_comparison.py``: every loss of the comparison on a tiny aligned CelebA set;
- ``bench/bench_embed.py``: ONNX Runtime vs PyTorch embedding throughput and the roofline.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CELEBA, LFW, REPO, SHARED, SHARED_MODELS, require_reference

QUICK_PAIRS = 16  # bench/loss_comparison.py --quick: LFW pairs evaluated (first fold)
QUICK_IDENTITIES = 10  # bench/loss_comparison.py --quick: CelebA identities trained on
#: bench/loss_comparison.py's losses, in its order
LOSSES = [
    "softmax",
    "l2softmax",
    "lsoftmax",
    "normface",
    "sphereface",
    "cosface",
    "arcface",
    "combined",
    "center",
    "marginal",
    "triplet",
    "triplet_batch_hard",
]


def run_quick(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_bench_batching_quick(default_models_dir):
    report = run_quick(
        "bench_batching.py",
        "--models-dir",
        str(default_models_dir),
        env={"FACEGATE_PROVIDERS": "CPUExecutionProvider"},
    )
    assert report["model"].startswith("dlib_resnet_v1@")
    assert report["faces"] == 16  # distinct LFW faces detected and aligned
    rows = {(row["concurrency"], row["batching"]): row for row in report["rows"]}
    assert len(report["rows"]) == 4 and set(rows) == {(1, False), (1, True), (8, False), (8, True)}
    for (concurrency, batching), row in rows.items():
        assert row["faces"] == 32 and row["seconds"] > 0
        assert row["faces_per_s"] == pytest.approx(row["faces"] / row["seconds"], rel=1e-2)
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["batches"] * row["mean_batch"] == pytest.approx(row["faces"], rel=1e-2)
        if not batching or concurrency == 1:  # one embedder call per face
            assert row["batches"] == row["faces"] and row["mean_batch"] == 1.0
    # Eight callers waiting on one batcher share embedder calls.
    assert 1.0 < rows[8, True]["mean_batch"] <= min(8, report["max_batch"])


@pytest.mark.timeout(300)
def test_bench_mtcnn_quick():
    require_reference("torch", "what facenet-pytorch's reference runs on (train extra)")
    report = run_quick("bench_mtcnn.py")
    references = ("facenet_pytorch", "facenet_pytorch_1thread")
    assert report["lfw"]["first_shape"] == [250, 250, 3]
    for dataset in ("lfw", "celeba"):
        row = report[dataset]
        assert row["images"] == 8
        for name in ("detect", "detect_batch", *references):
            assert row[name]["images_per_s"] > 0 and row[name]["cpu_s_per_image"] > 0, name
            # every photo shows a face; few show a second one
            assert row["images"] <= row[name]["faces"] <= 2 * row["images"], (dataset, name)
        assert row["detect"]["faces"] == row["detect_batch"]["faces"]
        for name in references:
            assert abs(row[name]["faces"] - row["detect"]["faces"]) <= 1, (dataset, name)
            assert row[f"cpu_ratio_{name}_vs_detect"] == pytest.approx(
                row[name]["cpu_s_per_image"] / row["detect"]["cpu_s_per_image"], rel=2e-2, abs=1e-2
            )


@pytest.mark.timeout(300)
def test_dlib_resnet_speed_quick(default_models_dir):
    require_reference("dlib", "the reference being timed (dlib-bin, dev extra)")
    report = run_quick(
        "dlib_resnet_speed.py", "--models-dir", str(default_models_dir), "--shared", str(SHARED)
    )
    assert report["chips"] == 8 and report["descriptor_shape"] == [8, 128]
    for name in ("onnxruntime", "dlib"):
        side = report[name]
        assert side["chips_per_second"] > 0 and side["seconds_per_batch"] > 0
        assert side["chips_per_second"] == pytest.approx(
            report["chips"] / side["seconds_per_batch"], rel=1e-2
        )
    assert report["speedup"] == pytest.approx(
        report["onnxruntime"]["chips_per_second"] / report["dlib"]["chips_per_second"], rel=1e-2
    )
    # Both sides computed the same descriptors from the same chips.
    assert report["max_abs_difference"] <= 1e-4


@pytest.mark.timeout(300)
def test_derive_dlib_template_quick(default_models_dir):
    pytest.importorskip("dlib", reason="dlib-bin (dev extra) builds the reference chips")
    from service.config import Settings
    from service.registry import Registry

    report = run_quick(
        "derive_dlib_template.py", "--models-dir", str(default_models_dir), "--shared", str(SHARED)
    )
    assert report["detector"] == "mtcnn" and report["photos"] == 20
    assert report["matched_faces"] >= 12  # mtcnn finds most faces dlib's HOG detector found
    assert report["chip_pixel_difference"] <= 1.0  # our chip transform is dlib's
    derived = report["template_mean"]
    eyes, nose, mouth = derived[:2], derived[2], derived[3:]
    assert eyes[0][0] < nose[0] < eyes[1][0] and mouth[0][0] < nose[0] < mouth[1][0]
    assert max(e[1] for e in eyes) < nose[1] < min(m[1] for m in mouth)
    # 20 photos reproduce the shipped template (derived from 392 faces) to a few pixels.
    card = Registry(Settings().manifest, [default_models_dir]).cards["dlib_resnet_v1"]
    shipped = np.asarray(card.alignment.template)
    assert np.abs(np.asarray(derived) - shipped).max() <= 5.0


@pytest.fixture(scope="module")
def aligned_tiny(tmp_path_factory) -> tuple[Path, Path]:
    """CelebA's first 10 identities (4 photos each) and the LFW photos of the first 16 pairs
    of the first fold, aligned by ``training.prepare`` as in
    tests/training/test_training_loop.py."""
    from service.pipeline.pairs import parse_pairs
    from training.prepare import prepare

    root = tmp_path_factory.mktemp("loss-comparison-data")
    names = sorted(p.name for p in (CELEBA / "images").iterdir() if p.is_dir())[:QUICK_IDENTITIES]
    report = prepare(
        CELEBA / "images",
        root / "celeba112",
        detector="yunet_2023mar",
        model_dirs=[SHARED_MODELS],
        limit_per_identity=4,
        identities=names,
        progress=False,
    )
    assert report.identities == QUICK_IDENTITIES and report.aligned >= 3 * QUICK_IDENTITIES
    pairs = [p for p in parse_pairs(LFW / "pairs.txt") if p.fold == 0]
    chosen = [p for p in pairs if p.same][: QUICK_PAIRS // 2] + [p for p in pairs if not p.same][
        : QUICK_PAIRS // 2
    ]
    keys = sorted({p.a for p in chosen} | {p.b for p in chosen})
    prepare(LFW / "images", root / "lfw112", model_dirs=[SHARED_MODELS], keys=keys, progress=False)
    return root / "celeba112", root / "lfw112"


@pytest.mark.timeout(300)
def test_loss_comparison_quick(aligned_tiny, tmp_path):
    require_reference("torch", "what the training losses run on (train extra)")
    data, lfw_aligned = aligned_tiny
    out = tmp_path / "out"
    report = run_quick(
        "loss_comparison.py",
        "--data",
        str(data),
        "--lfw-aligned",
        str(lfw_aligned),
        "--out",
        str(out),
    )
    runs = report["results"]
    assert [r["loss"] for r in runs] == LOSSES
    images = len(list(data.glob("*/*.png")))
    for r in runs:
        assert r["backbone"] == "mobilefacenet" and r["epochs"] == 2, r
        assert r["identities"] == QUICK_IDENTITIES and r["images"] == images, r
        assert (r["lfw_folds"], r["lfw_pairs_per_fold"]) == (1, QUICK_PAIRS), r
        assert math.isfinite(r["loss_first_epoch"]) and r["loss_first_epoch"] > 0, r
        assert math.isfinite(r["loss_last_epoch"]) and r["loss_last_epoch"] > 0, r
        # accuracy on the 16 pairs: a multiple of 1/16, at least chance (threshold fitted)
        assert 0.5 <= r["final_accuracy"] <= r["best_accuracy"] <= 1.0, r
        for accuracy in (r["final_accuracy"], r["best_accuracy"]):
            assert accuracy * QUICK_PAIRS == pytest.approx(
                round(accuracy * QUICK_PAIRS), abs=1e-4
            ), r
        assert 1 <= r["best_epoch"] <= 2 and 1 <= r["epochs_to_converge"] <= 2, r
        assert r["seconds"] >= 0 and r["samples_per_second"] > 0, r
    assert json.loads((out / "results.json").read_text()) == runs
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(LOSSES) and table[2].startswith("| mobilefacenet | softmax |")


@pytest.mark.timeout(300)
def test_bench_embed_quick():
    require_reference("torch", "what the benchmarked backbones are built with (train extra)")
    report = run_quick("bench_embed.py", env={"FACEGATE_PROVIDERS": "CPUExecutionProvider"})
    assert report["device"] == "cpu" and report["batches"] == [1, 8]
    result = report["backbones"]["mobilefacenet"]
    assert result["ort_providers"] == ["CPUExecutionProvider"]
    # MobileFaceNet is about 0.44 GFLOPs per 112x112 face (0.22 G multiply-adds)
    assert 0.3 < result["gflops_per_face"] < 0.6
    assert [row["batch"] for row in result["rows"]] == [1, 8]
    for row in result["rows"]:
        assert row["ort"] > 0 and row["torch_fp32"] > 0
    best = result["best_faces_per_s"]
    assert best["ort"] == max(row["ort"] for row in result["rows"])
    assert result["ort_vs_fastest_torch"] == pytest.approx(
        best["ort"] / best["torch_fp32"], rel=1e-2
    )
    roofline = result["roofline_faces_per_s"]["fp32"]
    assert roofline == pytest.approx(
        report["matmul_tflops"]["fp32"] * 1e12 / (result["gflops_per_face"] * 1e9), rel=0.05
    )
    assert result["ort_fraction_of_fp32_roofline"] == pytest.approx(
        best["ort"] / roofline, rel=0.02
    )
