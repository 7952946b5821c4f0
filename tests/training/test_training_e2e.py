"""prepare → train → evaluate → export → load in the service pipeline, on real photos."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import require_reference

torch = require_reference("torch", "the training package's framework (train extra)")

from tests.conftest import LFW, SHARED_MODELS
from tests.training.test_training_loop import celeba_tiny, tiny_config  # noqa: F401

PAIRS_PER_FOLD = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: CPU training on a shared 2-core box is fastest without OpenMP
    contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.timeout(600)
def test_prepare_train_evaluate_export_and_serve(celeba_tiny, tmp_path):  # noqa: F811
    import cv2

    from service.config import MANIFEST_PATH, Settings
    from service.pipeline.detectors import build_detector
    from service.pipeline.embed import OnnxEmbedder
    from service.pipeline.pairs import parse_pairs
    from service.pipeline.pipeline import Pipeline
    from service.registry import ModelCard, Registry
    from training import evaluate as ev
    from training.export import ExportError, export, load_backbone, parity_check
    from training.prepare import prepare
    from training.train import train

    # train: a few epochs of ArcFace on the aligned CelebA slice
    cfg = tiny_config(celeba_tiny, tmp_path / "run", "arcface", {"s": 16.0, "m": 0.3}, epochs=2)
    summary = train(cfg)
    checkpoint = tmp_path / "run" / "last.pt"
    assert checkpoint.is_file() and summary["steps"] >= 2
    assert (tmp_path / "run" / "metrics.csv").read_text().startswith("step,epoch,key,value")

    # evaluate: the first LFW fold's pairs, aligned by the same prepare step
    pairs = [p for p in parse_pairs(LFW / "pairs.txt") if p.fold == 0]
    chosen = [p for p in pairs if p.same][: PAIRS_PER_FOLD // 2] + [p for p in pairs if not p.same][
        : PAIRS_PER_FOLD // 2
    ]
    keys = sorted({p.a for p in chosen} | {p.b for p in chosen})
    lfw_aligned = tmp_path / "lfw112"
    prepare(LFW / "images", lfw_aligned, model_dirs=[SHARED_MODELS], keys=keys, progress=False)
    pair_set = ev.load_pairs(
        LFW / "pairs.txt", lfw_aligned, LFW / "images", folds=1, max_pairs_per_fold=PAIRS_PER_FOLD
    )
    assert len(pair_set.same) == PAIRS_PER_FOLD and pair_set.same.sum() == PAIRS_PER_FOLD // 2
    model, _ = load_backbone(checkpoint)
    embed = ev.torch_embedder(model, input_size=56)
    report = ev.evaluate_model(embed, pair_set)
    assert 0.0 <= report["accuracy"] <= 1.0
    assert set(report["tar_at_far"]) == {"1e-01", "1e-02", "1e-03", "1e-04"}
    paths = ev.save_report(report, tmp_path / "reports", "lfw")
    assert json.loads(paths["json"].read_text())["pairs"] == PAIRS_PER_FOLD
    assert paths["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # export: ONNX + card, parity on real aligned faces
    onnx_path = tmp_path / "models" / "tiny_arcface.onnx"
    result = export(
        checkpoint,
        onnx_path,
        pair_set.images[:8],
        evaluation={"lfw": {k: v for k, v in report.items() if k[0] != "_"}},
        thresholds=ev.card_thresholds(report),
    )
    assert result["parity"]["max_abs_diff"] < 1e-3 and result["parity"]["min_cosine"] > 0.9999
    card_json = json.loads((tmp_path / "models" / "tiny_arcface.card.json").read_text())
    card = ModelCard.model_validate(card_json)
    assert card.embedding_dim == 32 and card.preprocessing.input_size == (56, 56)
    loss = card.training["loss"]
    assert loss["name"] == "arcface" and loss["params"]["m"] == 0.3
    assert set(card.thresholds) == {"fmr_1e-2", "fmr_1e-3", "fmr_1e-4"}

    # a model that is not the exported one fails the parity check
    other, _ = load_backbone(checkpoint)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(ExportError, match="parity"):
        parity_check(other, onnx_path, pair_set.images[:4])

    # serve: the service resolves the file by its card and embeds a raw photo like training did
    registry = Registry(MANIFEST_PATH, [SHARED_MODELS])
    rec_card, rec_path = registry.resolve(str(onnx_path), task="recognition")
    det_card, det_path = registry.resolve("yunet_2023mar", task="detection")
    settings = Settings(providers=["CPUExecutionProvider"], batching=False)
    pipeline = Pipeline(
        build_detector(det_card, det_path, settings),
        OnnxEmbedder(rec_card, rec_path, settings, flip=False),
        settings,
    )
    key = keys[0]
    faces = pipeline.analyze((LFW / "images" / key).read_bytes(), "largest")
    assert faces.embeddings.shape == (1, 32)
    served = faces.embeddings[0]
    crop = cv2.imread(str(lfw_aligned / key.replace(".jpg", ".png")))
    trained = embed(crop[None])[0]
    trained /= np.linalg.norm(trained)
    assert float(served @ trained) > 0.999
    # a tampered file is refused by the registry
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    from service.registry import ModelError

    with pytest.raises(ModelError, match="checksum"):
        registry.resolve(str(onnx_path), task="recognition")
