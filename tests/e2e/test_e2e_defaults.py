"""Smoke test of ``facegate serve`` on the default models (``facegate models install``)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import LFW
from tests.support.service import ServeProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_models_dir):
    env = {
        "FACEGATE_MODELS_DIR": str(default_models_dir),
        "FACEGATE_DETECTOR": "mtcnn",
        "FACEGATE_RECOGNIZER": "dlib_resnet_v1",
    }
    srv = ServeProcess(tmp_path_factory.mktemp("defaults"), env=env).start(timeout=120)
    yield srv
    srv.stop()


def _photo(name: str, number: int) -> tuple[str, bytes]:
    return "f.jpg", (LFW / "images" / name / f"{name}_{number:04d}.jpg").read_bytes()


@pytest.mark.timeout(300)
def test_default_models_verify_enrol_identify(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        info = client.get("/v1/info").json()
        assert info["models"]["detector"]["name"] == "mtcnn"
        assert info["models"]["recognizer"]["name"] == "dlib_resnet_v1"
        for role in ("detector", "recognizer"):
            assert info["models"][role]["providers"][-1:] == ["CPUExecutionProvider"]

        same = client.post(
            "/v1/verify",
            files={"image1": _photo("Abel_Pacheco", 1), "image2": _photo("Abel_Pacheco", 4)},
        ).json()
        diff = client.post(
            "/v1/verify",
            files={"image1": _photo("Abel_Pacheco", 1), "image2": _photo("Akhmed_Zakayev", 1)},
        ).json()
        print(
            f"\ndefaults: same {same['similarity']:.3f}, different {diff['similarity']:.3f}, "
            f"threshold {same['threshold']} (calibrated={same['calibrated']})"
        )
        assert same["model"].startswith("dlib_resnet_v1@")
        assert same["similarity"] > diff["similarity"]
        # the card's default operating point (fmr_1e-2: TMR 97.8% on LFW) decides
        assert same["operating_point"] == diff["operating_point"] == "fmr_1e-2"
        assert same["calibrated"] and same["match"] is True and diff["match"] is False
        strict = client.post(
            "/v1/verify?operating_point=fmr_1e-4",
            files={"image1": _photo("Abel_Pacheco", 1), "image2": _photo("Akhmed_Zakayev", 1)},
        ).json()
        assert strict["threshold"] > same["threshold"] and strict["match"] is False

        people = ["Abel_Pacheco", "Akhmed_Zakayev", "Amber_Tamblyn", "Anders_Fogh_Rasmussen"]
        for person in people:
            assert (
                client.post("/v1/galleries/d/subjects", json={"subject_id": person}).status_code
                == 201
            )
            r = client.post(
                f"/v1/galleries/d/subjects/{person}/faces", files={"image": _photo(person, 1)}
            )
            assert r.status_code == 201, r.text
        r = client.post(
            "/v1/identify",
            data={"gallery": "d", "top_k": "2"},
            files={"image": _photo("Abel_Pacheco", 4)},
        )
        assert r.status_code == 200, r.text
        assert r.json()["faces"][0]["candidates"][0]["subject_id"] == "Abel_Pacheco"
