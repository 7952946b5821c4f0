"""The project's own trained models in ``models/``: cards valid, files verified, usable by the
service."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import LFW, REPO, SHARED_MODELS

SHIPPED = ["facegate_mfn_cosface", "facegate_mfn_arcface"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_and_embeds_a_real_face(name):
    from service.config import MANIFEST_PATH, Settings
    from service.pipeline.detectors import build_detector
    from service.pipeline.embed import OnnxEmbedder
    from service.pipeline.pipeline import Pipeline
    from service.registry import Registry

    card_json = json.loads((REPO / "models" / f"{name}.card.json").read_text())
    registry = Registry(MANIFEST_PATH, [SHARED_MODELS])
    card, path = registry.resolve(name, task="recognition")  # sha256-verified
    assert path == REPO / "models" / f"{name}.onnx"
    assert card.embedding_dim == 128 and card.preprocessing.input_size == (56, 56)
    assert card.preprocessing.mean == (127.5,) * 3 and card.preprocessing.std == (128.0,) * 3
    # honest cards: what it saw, how it scored, where its thresholds come from
    lfw = card.evaluation["lfw"]
    assert lfw["pairs"] == 6000 and lfw["folds"] == 10 and 0.5 < lfw["accuracy"] < 1.0
    assert card.evaluation["onnx_parity"]["min_cosine"] > 0.9999
    assert card.training["data"]["identities"] == 200
    assert card.training["loss"]["name"] in name
    assert not card.commercial_use and "CelebA" in card.licence
    th = card.thresholds
    assert th["fmr_1e-2"] < th["fmr_1e-3"] < th["fmr_1e-4"] <= 1.0
    assert card_json["default_operating_point"] == "fmr_1e-3"

    settings = Settings(providers=["CPUExecutionProvider"], batching=False)
    det_card, det_path = registry.resolve("yunet_2023mar", task="detection")
    pipeline = Pipeline(
        build_detector(det_card, det_path, settings), OnnxEmbedder(card, path, settings), settings
    )
    a = pipeline.analyze((LFW / "images/Abel_Pacheco/Abel_Pacheco_0001.jpg").read_bytes())
    b = pipeline.analyze((LFW / "images/Abel_Pacheco/Abel_Pacheco_0001.jpg").read_bytes())
    assert a.detections and a.embeddings[0].shape == (128,)
    assert np.linalg.norm(a.embeddings[0]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(a.embeddings[0], b.embeddings[0], atol=1e-6)


#: fine-tuned from dlib_resnet_v1 on the CelebA split's 150 training identities
FINETUNED = ["facegate_dlib_cosface", "facegate_dlib_arcface"]


@pytest.mark.parametrize("name", FINETUNED)
def test_finetuned_model_keeps_the_defaults_contract_and_verifies(name, default_models_dir):
    from service.config import MANIFEST_PATH, Settings
    from service.pipeline.detectors import build_detector
    from service.pipeline.embed import OnnxEmbedder
    from service.pipeline.pipeline import Pipeline
    from service.registry import Registry

    registry = Registry(MANIFEST_PATH, [default_models_dir])
    card, path = registry.resolve(name, task="recognition")  # sha256-verified
    assert path == REPO / "models" / f"{name}.onnx"
    default = registry.cards["dlib_resnet_v1"]
    assert card.preprocessing == default.preprocessing and card.alignment == default.alignment
    assert card.embedding_dim == 128 and card.training["init"] == "dlib_resnet_v1"
    assert not card.commercial_use and "CelebA" in card.licence
    assert card.training["loss"]["name"] in name
    lfw = card.evaluation["lfw_grayscale"]
    assert lfw["accuracy"] >= 0.97 and lfw["impostors"] > 29_000_000
    th = card.thresholds
    assert th["fmr_1e-2"] < th["fmr_1e-3"] < th["fmr_1e-4"] <= 1.0
    assert card.evaluation["onnx_parity"]["min_cosine"] > 0.9999

    settings = Settings(providers=["CPUExecutionProvider"], batching=False)
    det_card, det_path = registry.resolve("mtcnn", task="detection")
    pipeline = Pipeline(
        build_detector(det_card, det_path, settings), OnnxEmbedder(card, path, settings), settings
    )

    def embedding(person: str, number: int) -> np.ndarray:
        photo = LFW / "images" / person / f"{person}_{number:04d}.jpg"
        return pipeline.analyze(photo.read_bytes(), "largest").embeddings[0]

    anchor = embedding("Abel_Pacheco", 1)
    same, other = anchor @ embedding("Abel_Pacheco", 4), anchor @ embedding("Akhmed_Zakayev", 1)
    assert card.default_operating_point == default.default_operating_point == "fmr_1e-2"
    assert same > th["fmr_1e-2"] > other
