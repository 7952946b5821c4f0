"""``/v1/detect`` and ``/v1/embed`` against a real ``facegate serve`` process on 127.0.0.1.

Real LFW photos and insightface's group photo, the reference models from ../shared.
The embeddings a client gets must give, by its own cosine, the similarity and decision
``/v1/verify`` gives for the same pair.  One server (default settings otherwise) for the
module, which also shows that images by URL are off by default.
"""

from __future__ import annotations

import base64

import cv2
import httpx
import numpy as np
import pytest

from tests.conftest import GROUP_PHOTO, LFW
from tests.support.service import ServeProcess

SAME = ("Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0004.jpg")  # pairs.txt
OTHER = "Akhmed_Zakayev/Akhmed_Zakayev_0001.jpg"
QUALITY_KEYS = {
    "det_score",
    "face_width_px",
    "face_height_px",
    "face_size_px",
    "sharpness",
    "roll_deg",
    "yaw_ratio",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServeProcess(tmp_path_factory.mktemp("extract")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=60, trust_env=False) as c:
        yield c


def _photo(name: str) -> bytes:
    return (LFW / "images" / name).read_bytes()


def _embed(client: httpx.Client, image: bytes, **options) -> dict:
    r = client.post(
        "/v1/embed",
        files={"image": ("face.jpg", image)},
        data={k: str(v) for k, v in options.items()},
    )
    assert r.status_code == 200, r.text
    return r.json()


def _cosine(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.timeout(300)
def test_embeddings_give_verify_similarity_and_decision(client):
    a, b, c = _photo(SAME[0]), _photo(SAME[1]), _photo(OTHER)
    ea, eb, ec = _embed(client, a), _embed(client, b), _embed(client, c)
    for body in (ea, eb, ec):
        assert body["model"].startswith("mobilefacenet_peer_128d@")
        assert len(body["model_sha256"]) == 64 and body["model"][-12:] == body["model_sha256"][:12]
        assert body["detector"].startswith("yunet_2023mar@")
        assert body["embedding_dim"] == 128 and body["embedding_format"] == "float"
        assert body["image"] == {"width": 250, "height": 250}
        face = body["faces"][0]
        assert len(face["embedding"]) == 128
        assert np.linalg.norm(face["embedding"]) == pytest.approx(1.0, abs=1e-5)
        assert len(face["box"]) == 4 and len(face["landmarks"]) == 5
        assert set(face["quality"]) == QUALITY_KEYS and face["quality"]["sharpness"] > 0
        assert face["quality"]["det_score"] == pytest.approx(face["score"], abs=1e-5)

    same = client.post("/v1/verify", files={"image1": ("a.jpg", a), "image2": ("b.jpg", b)}).json()
    diff = client.post("/v1/verify", files={"image1": ("a.jpg", a), "image2": ("c.jpg", c)}).json()
    assert same["model"] == ea["model"]
    threshold = same["threshold"]
    cos_same = _cosine(ea["faces"][0]["embedding"], eb["faces"][0]["embedding"])
    cos_diff = _cosine(ea["faces"][0]["embedding"], ec["faces"][0]["embedding"])
    print(f"\ncosine same {cos_same:.4f}, different {cos_diff:.4f}, threshold {threshold}")
    assert cos_same >= threshold and same["match"] is True
    assert cos_diff < threshold and diff["match"] is False
    assert cos_same == pytest.approx(same["similarity"], abs=1e-5)
    assert cos_diff == pytest.approx(diff["similarity"], abs=1e-5)
    assert ea["faces"][0]["box"] == same["face1"]["box"]

    # base64 JSON in, base64 float32 out (option as a query parameter): the same vector
    r = client.post(
        "/v1/embed?embedding_format=base64", json={"image": base64.b64encode(a).decode()}
    )
    assert r.status_code == 200, r.text
    packed = r.json()
    assert packed["embedding_format"] == "base64"
    vector = np.frombuffer(base64.b64decode(packed["faces"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (128,)
    np.testing.assert_allclose(vector, ea["faces"][0]["embedding"], atol=1e-5)


@pytest.mark.timeout(300)
def test_detect_finds_every_face_of_the_group_photo(client):
    photo = GROUP_PHOTO.read_bytes()
    r = client.post("/v1/detect?timings=true", files={"image": ("group.jpg", photo)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"].startswith("yunet_2023mar@")
    assert body["image"]["width"] == 1280 and body["image"]["height"] > 0
    faces = body["faces"]
    assert len(faces) == 6
    areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in faces]
    assert areas == sorted(areas, reverse=True), "faces are not largest first"
    for face in faces:
        assert "embedding" not in face and len(face["landmarks"]) == 5
        assert set(face["quality"]) == QUALITY_KEYS
        assert face["quality"]["face_size_px"] >= 20
    assert {"decode", "detect", "align"} <= set(body["timings"]) and "embed" not in body["timings"]

    # max_faces keeps the largest; multiple_faces picks or refuses
    r = client.post("/v1/detect", files={"image": ("group.jpg", photo)}, data={"max_faces": "2"})
    assert [f["box"] for f in r.json()["faces"]] == [f["box"] for f in faces[:2]]
    three = _embed(client, photo, max_faces=3)
    assert [f["box"] for f in three["faces"]] == [f["box"] for f in faces[:3]]
    assert all(len(f["embedding"]) == 128 for f in three["faces"])
    largest = _embed(client, photo, multiple_faces="largest")["faces"]
    assert len(largest) == 1 and largest[0]["box"] == faces[0]["box"]
    for route in ("/v1/detect", "/v1/embed"):
        r = client.post(
            route, files={"image": ("group.jpg", photo)}, data={"multiple_faces": "refuse"}
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "multiple_faces", r.text
        # one face is fine under refuse
        r = client.post(
            route, files={"image": ("a.jpg", _photo(SAME[0]))}, data={"multiple_faces": "refuse"}
        )
        assert r.status_code == 200 and len(r.json()["faces"]) == 1, r.text


@pytest.mark.timeout(300)
def test_detect_and_embed_bad_input(server, client):
    blank = _grey_png()
    for route in ("/v1/detect", "/v1/embed"):
        # no face: an empty list, not an error
        r = client.post(route, files={"image": ("blank.png", blank)})
        assert r.status_code == 200, r.text
        assert r.json()["faces"] == [] and r.json()["image"] == {"width": 64, "height": 48}
        cases = [
            (
                {"files": {"image": ("t.txt", b"plain text, not an image\n" * 4)}},
                415,
                "unsupported_image_type",
            ),
            ({"files": {"image": ("e.jpg", b"")}}, 400, "empty_image"),
            ({"json": {"max_faces": 2}}, 422, "missing_field"),
            (
                {"files": {"image": ("a.jpg", blank)}, "data": {"max_faces": "0"}},
                422,
                "validation_error",
            ),
            (
                {"files": {"image": ("a.jpg", blank)}, "data": {"top_k": "3"}},
                422,
                "validation_error",
            ),
            ({"json": {"image": "@@not base64@@"}}, 400, "invalid_base64"),
            # images by URL are off unless FACEGATE_URL_ALLOWLIST names hosts
            ({"json": {"image_url": f"{server.base_url}/healthz"}}, 400, "url_not_allowed"),
        ]
        for kwargs, status, code in cases:
            r = client.post(route, **kwargs)
            assert r.status_code == status and r.json()["error"]["code"] == code, (route, r.text)
        r = client.post(route, json={"image_url": "http://127.0.0.1:9/a.jpg"})
        assert "FACEGATE_URL_ALLOWLIST" in r.json()["error"]["message"]
    r = client.post(
        "/v1/embed", files={"image": ("a.jpg", blank)}, data={"embedding_format": "hex"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    r = client.post(
        "/v1/verify",
        json={"image1_url": "http://127.0.0.1:9/a.jpg", "image2_url": "http://127.0.0.1:9/b.jpg"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "url_not_allowed"

    metrics = httpx.get(f"{server.base_url}/metrics", trust_env=False).text
    for series in (
        'facegate_http_requests_total{method="POST",route="/v1/detect",status="200"}',
        'facegate_http_requests_total{method="POST",route="/v1/embed",status="200"}',
        'facegate_http_request_seconds_count{method="POST",route="/v1/embed"}',
        'facegate_stage_seconds_count{route="/v1/detect",stage="quality"}',
        'facegate_rejects_total{reason="url_not_allowed"}',
        'facegate_rejects_total{reason="unsupported_image_type"}',
    ):
        assert series in metrics, series
    assert 'status="500"' not in metrics


def _grey_png() -> bytes:
    ok, buf = cv2.imencode(".png", np.full((48, 64, 3), 128, np.uint8))
    assert ok
    return buf.tobytes()


def test_info_reports_url_fetching_off_by_default(client):
    info = client.get("/v1/info").json()
    assert info["image_urls"] == {"enabled": False, "allowed_hosts": [], "timeout_s": 5.0}
    assert info["store_images"] is False
