"""One rule for the main face: ``facegate verify`` and ``POST /v1/verify`` compare the same
faces of a photo with several people, and refuse an unknown operating point alike."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.cli import main
from service.config import Settings
from tests.conftest import LFW, SHARED_MODELS
from tests.support.service import InProcessServer

MODELS = [
    "--models-dir",
    str(SHARED_MODELS),
    "--detector",
    "yunet_2023mar",
    "--recognizer",
    "mobilefacenet_peer_128d",
]


def lfw(name: str, number: int) -> Path:
    return LFW / "images" / name / f"{name}_{number:04d}.jpg"


@pytest.fixture(scope="module")
def two_people(tmp_path_factory) -> Path:
    """Abel Pacheco enlarged 1.5x at the left edge, Aaron Peirsol at his own size in the
    middle: the largest face is not the most central one."""
    big = Image.open(lfw("Abel_Pacheco", 1)).convert("RGB").resize((375, 375))
    small = Image.open(lfw("Aaron_Peirsol", 1)).convert("RGB")
    canvas = Image.new("RGB", (1000, 400), (128, 128, 128))
    canvas.paste(big, (0, 12))
    canvas.paste(small, (375 + 25, 75))
    path = tmp_path_factory.mktemp("main-face") / "two_people.png"
    canvas.save(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer="mobilefacenet_peer_128d",
        providers=["CPUExecutionProvider"],
        data_dir=tmp_path_factory.mktemp("main-face-server"),
    )
    srv = InProcessServer(settings).start()
    yield srv
    srv.stop()


def cli(capsys, *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    return code, json.loads(capsys.readouterr().out)


def rest(server, *paths: Path, **fields: str) -> httpx.Response:
    files = {f"image{k + 1}": (p.name, p.read_bytes()) for k, p in enumerate(paths)}
    return httpx.post(f"{server.base_url}/v1/verify", files=files, data=fields, timeout=60)


def test_cli_and_rest_compare_the_same_main_face(server, capsys, two_people):
    # The detector's own view of the composed photo: two faces, the larger off-centre.
    faces = server.state.pipeline.detect(server.state.pipeline.decode(two_people.read_bytes()))
    assert len(faces) == 2
    largest = max(faces, key=lambda d: d.area)
    assert (largest.box[0] + largest.box[2]) / 2 < 375  # on Abel Pacheco's side
    other = lfw("Abel_Pacheco", 4)

    code, by_cli = cli(capsys, "verify", str(two_people), str(other), *MODELS)
    answer = rest(server, two_people, other)
    assert code == 0 and answer.status_code == 200, answer.text
    by_rest = answer.json()
    assert by_cli["faces"] == {"a": 2, "b": 1}
    np.testing.assert_allclose(by_cli["face_a"]["box"], by_rest["face1"]["box"], atol=0.01)
    np.testing.assert_allclose(by_cli["face_a"]["box"], largest.box, atol=0.01)
    assert by_cli["similarity"] == pytest.approx(by_rest["similarity"], abs=1e-5)
    assert by_cli["match"] is by_rest["match"] is True  # Abel Pacheco, not Aaron Peirsol
    assert by_cli["threshold"] == by_rest["threshold"]
    assert by_cli["operating_point"] == by_rest["operating_point"]


def test_cli_and_rest_refuse_an_unknown_operating_point(server, capsys, two_people):
    other = lfw("Abel_Pacheco", 4)
    code, by_cli = cli(
        capsys, "verify", str(two_people), str(other), *MODELS, "--operating-point", "fmr_1e-9"
    )
    answer = rest(server, two_people, other, operating_point="fmr_1e-9")
    assert code == 3 and answer.status_code == 400
    assert by_cli["error"]["code"] == answer.json()["error"]["code"] == "unknown_operating_point"
    assert by_cli["error"]["message"] == answer.json()["error"]["message"]
    assert "fmr_1e-3" in by_cli["error"]["message"]  # it lists the points there are


def test_verify_timings_add_up_to_the_request(server, two_people):
    """``?timings=true``: per request, stage by stage, summed over both images; the stages
    run one after another, so they add up to at most ``total``, itself within the time the
    client waited."""
    import time

    for _ in range(3):
        started = time.perf_counter()
        files = {
            "image1": ("a.png", two_people.read_bytes()),
            "image2": ("b.jpg", lfw("Abel_Pacheco", 4).read_bytes()),
        }
        answer = httpx.post(f"{server.base_url}/v1/verify?timings=true", files=files, timeout=60)
        waited_ms = (time.perf_counter() - started) * 1000.0
        assert answer.status_code == 200, answer.text
        timings = answer.json()["timings"]
        stages = {k: v for k, v in timings.items() if k != "total"}
        assert set(stages) == {"decode", "detect", "align", "embed"}
        assert all(v > 0 for v in stages.values())
        assert sum(stages.values()) <= timings["total"] <= waited_ms
