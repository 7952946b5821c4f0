"""``facegate-train`` itself: prepare → train → evaluate → export on real photos, the exported
model served by the service's embedder, and bad arguments answered with a message."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from tests.conftest import require_reference

torch = require_reference("torch", "the training package's framework (train extra)")

from tests.conftest import CELEBA, LFW, SHARED_MODELS
from tests.training.test_training_loop import IDENTITIES, PER_IDENTITY, tiny_config
from training.cli import main

PAIRS = 8  # the first LFW fold's first 4 same and 4 different pairs
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # --threads 1 sets it for the process


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--threads", "1", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def link_subset(dst, files) -> None:
    """``dst/<identity>/<file>`` links to real photos (read in place, never copied)."""
    for path in files:
        (dst / path.parent.name).mkdir(parents=True, exist_ok=True)
        (dst / path.parent.name / path.name).symlink_to(path)


@pytest.mark.timeout(300)
def test_cli_prepare_train_evaluate_export_then_serve(tmp_path, capsys):
    from service.config import MANIFEST_PATH, Settings
    from service.pipeline.embed import OnnxEmbedder
    from service.pipeline.pairs import parse_pairs
    from service.registry import ModelCard, Registry, sha256_file
    from training import evaluate as ev
    from training.export import load_backbone

    # prepare: a CelebA slice (IDENTITIES x PER_IDENTITY photos) and the photos of a few LFW pairs
    names = sorted(p.name for p in (CELEBA / "images").iterdir() if p.is_dir())[:IDENTITIES]
    photos = {n: sorted((CELEBA / "images" / n).iterdir()) for n in names}
    link_subset(tmp_path / "celeba", [f for files in photos.values() for f in files])
    celeba = tmp_path / "celeba112"
    code, out, err = cli(
        capsys,
        "prepare",
        tmp_path / "celeba",
        celeba,
        "--models-dir",
        SHARED_MODELS,
        "--limit-per-identity",
        PER_IDENTITY,
        "--workers",
        1,
        "--quiet",
    )
    summary = json.loads(out)
    assert code == 0, err
    assert summary["images"] == sum(min(len(f), PER_IDENTITY) for f in photos.values())
    assert summary["identities"] == IDENTITIES
    assert summary["aligned"] >= IDENTITIES * 3 and summary["detector"] == "yunet_2023mar"
    crops = sorted(celeba.glob("*/*.png"))
    assert len(crops) == summary["aligned"]
    assert cv2.imread(str(crops[0])).shape == (112, 112, 3)
    assert json.loads((celeba / "dataset.json").read_text())["aligned"] == summary["aligned"]

    fold = [p for p in parse_pairs(LFW / "pairs.txt") if p.fold == 0]
    chosen = [p for p in fold if p.same][: PAIRS // 2] + [p for p in fold if not p.same][
        : PAIRS // 2
    ]
    keys = sorted({p.a for p in chosen} | {p.b for p in chosen})
    link_subset(tmp_path / "lfw", [LFW / "images" / k for k in keys])
    lfw = tmp_path / "lfw112"
    code, out, err = cli(
        capsys,
        "prepare",
        tmp_path / "lfw",
        lfw,
        "--models-dir",
        SHARED_MODELS,
        "--workers",
        1,
        "--quiet",
    )
    assert code == 0 and json.loads(out)["images"] == len(keys), err
    pairs = [
        "--pairs",
        LFW / "pairs.txt",
        "--aligned",
        lfw,
        "--raw",
        LFW / "images",
        "--folds",
        1,
        "--max-pairs-per-fold",
        PAIRS,
    ]

    # train: the tiny config as a JSON file, the epoch count as a command-line override
    run = tmp_path / "run"
    config = tmp_path / "tiny.json"
    config.write_text(
        json.dumps(tiny_config(celeba, run, "arcface", {"s": 16.0, "m": 0.3}, epochs=5).to_dict())
    )
    code, out, err = cli(capsys, "train", "--config", config, "epochs=2")
    trained = json.loads(out.strip().splitlines()[-1])
    assert code == 0, err
    assert trained["identities"] == IDENTITIES and trained["images"] == summary["aligned"]
    assert trained["steps"] >= 2 and "history" not in trained
    checkpoint = run / "last.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["config"]["epochs"] == 2 and state["epoch"] == 2
    assert state["config"]["data"]["root"] == str(celeba)

    # evaluate: JSON report + ROC plot of the checkpoint on the chosen pairs
    code, out, err = cli(
        capsys, "evaluate", checkpoint, *pairs, "--out", tmp_path / "reports", "--stem", "lfw"
    )
    evaluated = json.loads(out)
    assert code == 0, err
    report = json.loads((tmp_path / "reports" / "lfw.json").read_text())
    assert evaluated["json"] == str(tmp_path / "reports" / "lfw.json")
    assert report["pairs"] == PAIRS and report["accuracy"] == evaluated["accuracy"]
    assert 0.0 <= report["accuracy"] <= 1.0
    assert set(report["tar_at_far"]) == {"1e-01", "1e-02", "1e-03", "1e-04"}
    assert (tmp_path / "reports" / "lfw_roc.png").read_bytes()[:8] == PNG
    assert evaluated["roc"] == str(tmp_path / "reports" / "lfw_roc.png")

    # export: ONNX + card with a passing parity check, the evaluation and the training note
    onnx_path = tmp_path / "models" / "tiny_cli.onnx"
    code, out, err = cli(
        capsys,
        "export",
        checkpoint,
        onnx_path,
        *pairs,
        "--parity-faces",
        8,
        "--description",
        "tiny CLI model",
        "--training-note",
        '{"note": "cli"}',
        "--reports",
        tmp_path / "export_reports",
    )
    exported = json.loads(out)
    assert code == 0, err
    assert exported["onnx"] == str(onnx_path) and exported["accuracy"] == report["accuracy"]
    parity = exported["parity"]
    assert parity["faces"] == 8 and parity["max_abs_diff"] < 1e-3 and parity["min_cosine"] > 0.9999
    card = ModelCard.model_validate_json((tmp_path / "models" / "tiny_cli.card.json").read_text())
    assert exported["card"] == str(tmp_path / "models" / "tiny_cli.card.json")
    assert card.name == "tiny_cli" and card.sha256 == sha256_file(onnx_path)
    assert card.embedding_dim == 32 and card.preprocessing.input_size == (56, 56)
    assert card.description == "tiny CLI model" and card.training["note"] == "cli"
    assert card.training["loss"]["name"] == "arcface" and card.training["epochs"] == 2
    assert card.evaluation["lfw"]["accuracy"] == report["accuracy"]
    assert card.evaluation["onnx_parity"]["faces"] == 8
    assert set(card.thresholds) == {"fmr_1e-2", "fmr_1e-3", "fmr_1e-4"}
    assert (tmp_path / "export_reports" / "tiny_cli_roc.png").read_bytes()[:8] == PNG

    # the exported file evaluates like the checkpoint it came from
    code, out, err = cli(capsys, "evaluate", onnx_path, *pairs, "--out", tmp_path / "onnx_reports")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == report["accuracy"]

    # serve: the service's embedder loads the file by its card; unit-norm embeddings of the
    # card's dimension, the checkpoint's flip-summed ones (the evaluation protocol)
    rec_card, rec_path = Registry(MANIFEST_PATH, [SHARED_MODELS]).resolve(
        str(onnx_path), "recognition"
    )
    embedder = OnnxEmbedder(
        rec_card, rec_path, Settings(providers=["CPUExecutionProvider"], batching=False), flip=True
    )
    faces = ev.load_pairs(LFW / "pairs.txt", lfw, LFW / "images", 1, PAIRS).images[:4]
    served = embedder.embed(faces)
    assert served.shape == (4, card.embedding_dim) and served.dtype == np.float32
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    model, _ = load_backbone(checkpoint)
    reference = ev.flip_embeddings(ev.torch_embedder(model, input_size=56), faces)
    assert np.min(np.sum(served * reference, axis=1)) > 0.999

    # bad arguments: exit code 1, a one-line message naming the problem, nothing written
    missing = tmp_path / "missing.pt"
    code, out, err = cli(capsys, "evaluate", missing, *pairs, "--out", tmp_path / "bad")
    assert code == 1 and out == ""
    assert err == f"error: {missing}: No such file or directory\n"
    assert not (tmp_path / "bad").exists()
    code, out, err = cli(capsys, "train", "--config", config, "loss.nope=1")
    assert code == 1 and err == "error: unknown LossConfig keys: ['nope']\n"
    bad_onnx = tmp_path / "models" / "no_parity.onnx"
    code, out, err = cli(capsys, "export", checkpoint, bad_onnx, *pairs, "--parity-faces", 0)
    assert code == 1 and err == "error: parity check needs at least one aligned face\n"
    assert not bad_onnx.exists() and not bad_onnx.with_name("no_parity.card.json").exists()
