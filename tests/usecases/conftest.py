"""What the use-case tests share: the reference models (YuNet and the MobileFaceNet peer
from ../shared, on the CPU) as settings and a loaded pipeline, one per test module, and the
LFW photos they enrol and probe with."""

from __future__ import annotations

import pytest

from service.config import Settings
from service.pipeline.pipeline import Pipeline
from tests.conftest import LFW, SHARED_MODELS

#: a PNG signature with no image behind it: refused by the decoder, before any model runs
NOT_AN_IMAGE = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def lfw(name: str, number: int) -> bytes:
    return (LFW / "images" / name / f"{name}_{number:04d}.jpg").read_bytes()


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer="mobilefacenet_peer_128d",
        providers=["CPUExecutionProvider"],
        data_dir=tmp_path_factory.mktemp("usecases"),
        faiss_gpu=False,
    )


@pytest.fixture(scope="module")
def pipeline(settings) -> Pipeline:
    return Pipeline.from_settings(settings)
