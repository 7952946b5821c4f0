"""Bad requests get typed errors, never a 500, and leave the gallery exactly as it was.

A real uvicorn server (in-process, 127.0.0.1) with API keys and small limits,
the reference models from ../shared and real LFW photos.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from tests.conftest import LFW, SHARED_MODELS
from tests.support.service import InProcessServer

KEY = "alpha-key-0123"
LIMITS = {
    "max_image_bytes": 1_000_000,
    "max_request_bytes": 1_500_000,
    "max_image_pixels": 4_000_000,
    "top_k_max": 50,
}


def _jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return buf.tobytes()


def _smaller(image: np.ndarray) -> np.ndarray:
    """The photo at 60 % size on a grey canvas of the original height."""
    small = cv2.resize(image, (150, 150), interpolation=cv2.INTER_AREA)
    canvas = np.full((image.shape[0], 150, 3), 128, np.uint8)
    canvas[50:200] = small
    return canvas


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (valid CRC)."""
    data = bytearray(_png(Image.new("L", (1, 1))))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    face = (LFW / "images/Abel_Pacheco/Abel_Pacheco_0001.jpg").read_bytes()
    other = (LFW / "images/Akhmed_Zakayev/Akhmed_Zakayev_0001.jpg").read_bytes()
    a = cv2.imdecode(np.frombuffer(face, np.uint8), cv2.IMREAD_COLOR)
    b = cv2.imdecode(np.frombuffer(other, np.uint8), cv2.IMREAD_COLOR)
    rng = np.random.default_rng(0)
    return {
        "face": face,
        "face2": (LFW / "images/Abel_Pacheco/Abel_Pacheco_0004.jpg").read_bytes(),
        "other": other,
        "two_faces": _jpeg(np.concatenate([a, _smaller(b)], axis=1)),
        # candidates; the server's own detector picks the ones that fit (see _quality_images)
        "small_candidates": [
            _jpeg(cv2.resize(a, (s, s), interpolation=cv2.INTER_AREA)) for s in (70, 80, 60, 90, 50)
        ],
        "blurred_candidates": [_jpeg(cv2.GaussianBlur(a, (0, 0), sigma)) for sigma in range(3, 12)]
        + [_jpeg((a * c).astype(np.uint8)) for c in (0.12, 0.1, 0.09, 0.08)],
        "blank": _png(Image.new("RGB", (200, 200), (128, 128, 128))),
        "truncated": face[: len(face) // 2],
        "png_bomb": _png(Image.new("L", (3000, 3000))),
        "huge_dims": _png_claiming(60_000, 60_000),
        "text": b"this is plain text, not an image\n" * 10,
        "too_big": b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 1_200_000, np.uint8).tobytes(),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer="mobilefacenet_peer_128d",
        providers=["CPUExecutionProvider"],
        data_dir=tmp_path_factory.mktemp("bad-input"),
        api_keys=[KEY, "beta-key-4567"],
        **LIMITS,
    )
    srv = InProcessServer(settings).start()
    yield srv
    srv.stop()


def _quality_images(server, images: dict) -> None:
    """Pick, with the server's own detector, one photo whose single face is too small and one
    whose single face is large enough but scored under the enrolment minimum."""
    pipeline, settings = server.state.pipeline, server.state.settings

    def faces(data: bytes):
        return pipeline.detect(pipeline.decode(data))

    def pick(candidates, fits):
        for data in candidates:
            found = faces(data)
            if len(found) == 1 and fits(found[0]):
                return data
        raise AssertionError("no candidate photo fits; the detector changed a lot")

    images["small_face"] = pick(
        images["small_candidates"], lambda d: min(d.width, d.height) < settings.enroll_min_face_size
    )
    images["blurred"] = pick(
        images["blurred_candidates"],
        lambda d: (
            min(d.width, d.height) >= settings.enroll_min_face_size
            and d.score < settings.enroll_min_det_score
        ),
    )


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": KEY}, timeout=60) as c:
        yield c


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _snapshot(server, client) -> dict:
    gallery = server.state.gallery
    subjects = client.get("/v1/galleries/people/subjects").json()
    return {
        "stats": gallery.stats(),
        "galleries": client.get("/v1/galleries").json(),
        "subjects": subjects,
        "sync": gallery.sync_status()["applied_seq"],
    }


@pytest.mark.timeout(300)
def test_good_requests_work_under_auth(server, client, images):
    r = client.post(
        "/v1/galleries/people/subjects",
        json={"subject_id": "abel", "metadata": {"name": "Abel Pacheco"}},
    )
    assert r.status_code in (200, 201), r.text
    r = client.post("/v1/galleries/people/subjects/abel/faces", files={"image": images["face"]})
    assert r.status_code == 201, r.text
    enrolled = r.json()
    assert enrolled["face_id"] >= 1
    quality = enrolled["quality"]
    assert quality["face_size_px"] >= 40 and quality["det_score"] >= 0.8
    assert quality["sharpness"] > 0

    # base64 JSON and multipart give the same answer
    r1 = client.post(
        "/v1/verify?timings=true",
        json={"image1": _b64(images["face"]), "image2": _b64(images["face2"])},
    )
    r2 = client.post("/v1/verify", files={"image1": images["face"], "image2": images["face2"]})
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    same, same2 = r1.json(), r2.json()
    assert same["similarity"] == pytest.approx(same2["similarity"], abs=1e-5)
    assert {"decode", "detect", "align", "embed"} <= set(same["timings"])
    assert "timings" not in same2
    assert same["model"].startswith("mobilefacenet_peer_128d@")
    r = client.post("/v1/verify", files={"image1": images["face"], "image2": images["other"]})
    different = r.json()
    # several faces: the largest is used unless refused
    r = client.post("/v1/verify", files={"image1": images["two_faces"], "image2": images["face2"]})
    assert r.status_code == 200, r.text
    assert r.json()["face1"]["box"][2] <= 250, "the larger face (left half) was not chosen"
    assert r.json()["similarity"] > different["similarity"]
    assert different["similarity"] < same["similarity"]
    assert different["match"] is False

    r = client.post(
        "/v1/identify", data={"gallery": "people", "top_k": "3"}, files={"image": images["face2"]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    face = body["faces"][0]
    best = face["candidates"][0]
    assert best["subject_id"] == "abel"
    assert best["similarity"] == pytest.approx(same["similarity"], abs=1e-5)
    assert face["match"] == ("abel" if best["similarity"] >= body["threshold"] else None)
    # an explicit threshold under the score matches
    r = client.post(
        "/v1/identify",
        json={
            "image": _b64(images["face2"]),
            "gallery": "people",
            "threshold": best["similarity"] - 0.01,
        },
    )
    assert r.json()["faces"][0]["match"] == "abel"
    # an explicit threshold above every score leaves the face unmatched (open set)
    r = client.post(
        "/v1/identify",
        json={"image": _b64(images["face2"]), "gallery": "people", "threshold": 0.99},
    )
    assert r.json()["faces"][0]["match"] is None and r.json()["operating_point"] is None

    # health and metrics are open; /v1 needs the key
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200
    assert httpx.get(f"{server.base_url}/readyz").json()["status"] == "ready"
    assert httpx.get(f"{server.base_url}/v1/info").status_code == 401
    metrics = httpx.get(f"{server.base_url}/metrics").text
    for series in (
        'facegate_stage_seconds_count{route="/v1/verify",stage="detect"}',
        'facegate_stage_seconds_count{route="/v1/identify",stage="search"}',
        "facegate_faces_per_image_count",
        'facegate_gallery_faces{gallery="people"} 1.0',
        'facegate_http_request_seconds_count{method="POST",route="/v1/verify"}',
    ):
        assert series in metrics, series
    info = client.get("/v1/info").json()
    assert info["models"]["recognizer"]["sha256"].startswith("f055d9c9")
    assert "CPUExecutionProvider" in info["models"]["recognizer"]["providers"]


CASES = [
    # (name, method, url, request kwargs (images by key), status, code)
    (
        "truncated jpeg",
        "POST",
        "/v1/verify",
        {"files": {"image1": "truncated", "image2": "face"}},
        400,
        "corrupt_image",
    ),
    (
        "png bomb",
        "POST",
        "/v1/identify",
        {"files": {"image": "png_bomb"}, "data": {"gallery": "people"}},
        413,
        "too_many_pixels",
    ),
    (
        "huge dimensions",
        "POST",
        "/v1/verify",
        {"files": {"image1": "huge_dims", "image2": "face"}},
        413,
        "too_many_pixels",
    ),
    (
        "zero bytes",
        "POST",
        "/v1/verify",
        {"files": {"image1": "face", "image2": b""}},
        400,
        "empty_image",
    ),
    (
        "text as image",
        "POST",
        "/v1/verify",
        {"files": {"image1": "text", "image2": "face"}},
        415,
        "unsupported_image_type",
    ),
    (
        "wrong content type",
        "POST",
        "/v1/verify",
        {"content": b"image1=abc", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    (
        "invalid base64",
        "POST",
        "/v1/verify",
        {"json": {"image1": "@@not-base64@@", "image2": "x"}},
        400,
        "invalid_base64",
    ),
    (
        "form-urlencoded body",
        "POST",
        "/v1/identify",
        {"data": {"gallery": "people"}},
        415,
        "unsupported_media_type",
    ),
    (
        "multipart without boundary",
        "POST",
        "/v1/verify",
        {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
        400,
        "invalid_multipart",
    ),
    (
        "invalid json",
        "POST",
        "/v1/verify",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
    ),
    ("json not an object", "POST", "/v1/identify", {"json": ["people"]}, 400, "invalid_json"),
    (
        "unknown gallery",
        "POST",
        "/v1/identify",
        {"files": {"image": "face"}, "data": {"gallery": "nobody"}},
        404,
        "gallery_not_found",
    ),
    (
        "unknown subject (enrol)",
        "POST",
        "/v1/galleries/people/subjects/ghost/faces",
        {"files": {"image": "face"}},
        404,
        "subject_not_found",
    ),
    (
        "unknown subject (get)",
        "GET",
        "/v1/galleries/people/subjects/ghost",
        {},
        404,
        "subject_not_found",
    ),
    (
        "unknown subject (verify)",
        "POST",
        "/v1/verify",
        {"files": {"image1": "face"}, "data": {"gallery": "people", "subject_id": "ghost"}},
        404,
        "subject_not_found",
    ),
    (
        "subject without faces (verify)",
        "POST",
        "/v1/verify",
        {"files": {"image1": "face"}, "data": {"gallery": "people", "subject_id": "faceless"}},
        422,
        "no_enrolled_face",
    ),
    (
        "image2 and a subject",
        "POST",
        "/v1/verify",
        {
            "files": {"image1": "face", "image2": "face2"},
            "data": {"gallery": "people", "subject_id": "abel"},
        },
        400,
        "ambiguous_request",
    ),
    ("unknown face", "DELETE", "/v1/galleries/people/faces/999999", {}, 404, "face_not_found"),
    ("unknown gallery (delete)", "DELETE", "/v1/galleries/nobody", {}, 404, "gallery_not_found"),
    (
        "duplicate image field",
        "POST",
        "/v1/identify",
        {"files": [("image", "face"), ("image", "face2")], "data": {"gallery": "people"}},
        400,
        "duplicate_field",
    ),
    (
        "top_k zero",
        "POST",
        "/v1/identify",
        {"files": {"image": "face"}, "data": {"gallery": "people", "top_k": "0"}},
        422,
        "validation_error",
    ),
    (
        "top_k above max",
        "POST",
        "/v1/identify",
        {"files": {"image": "face"}, "data": {"gallery": "people", "top_k": "51"}},
        422,
        "validation_error",
    ),
    (
        "unknown operating point",
        "POST",
        "/v1/verify",
        {"files": {"image1": "face", "image2": "face2"}, "data": {"operating_point": "fmr_1e-9"}},
        400,
        "unknown_operating_point",
    ),
    (
        "threshold and operating point",
        "POST",
        "/v1/identify",
        {
            "files": {"image": "face"},
            "data": {"gallery": "people", "threshold": "0.3", "operating_point": "fmr_1e-3"},
        },
        400,
        "ambiguous_request",
    ),
    (
        "no face",
        "POST",
        "/v1/verify",
        {"files": {"image1": "blank", "image2": "face"}},
        422,
        "no_face",
    ),
    (
        "two faces, refuse policy",
        "POST",
        "/v1/verify",
        {"files": {"image1": "two_faces", "image2": "face"}, "data": {"multiple_faces": "refuse"}},
        422,
        "multiple_faces",
    ),
    (
        "bad multiple_faces policy",
        "POST",
        "/v1/verify",
        {"files": {"image1": "face", "image2": "face"}, "data": {"multiple_faces": "median"}},
        422,
        "validation_error",
    ),
    (
        "enrol two faces",
        "POST",
        "/v1/galleries/people/subjects/abel/faces",
        {"files": {"image": "two_faces"}},
        422,
        "multiple_faces",
    ),
    (
        "enrol small face",
        "POST",
        "/v1/galleries/people/subjects/abel/faces",
        {"files": {"image": "small_face"}},
        422,
        "face_too_small",
    ),
    (
        "enrol blurred face",
        "POST",
        "/v1/galleries/people/subjects/abel/faces",
        {"files": {"image": "blurred"}},
        422,
        "low_quality_face",
    ),
    (
        "enrol into other model's gallery",
        "POST",
        "/v1/galleries/legacy/subjects/old/faces",
        {"files": {"image": "face"}},
        409,
        "model_mismatch",
    ),
    (
        "oversized body",
        "POST",
        "/v1/verify",
        {"files": {"image1": "too_big", "image2": "too_big"}},
        413,
        "request_too_large",
    ),
    (
        "oversized chunked body",
        "POST",
        "/v1/verify",
        {"content": "chunked", "headers": {"content-type": "application/json"}},
        413,
        "request_too_large",
    ),
    (
        "image over the image limit",
        "POST",
        "/v1/verify",
        {"files": {"image1": "too_big", "image2": "face"}},
        413,
        "image_too_large",
    ),
    (
        "file in an option field",
        "POST",
        "/v1/identify",
        {"data": {"gallery": "people"}, "files": {"other": "face"}},
        400,
        "unexpected_file",
    ),
    (
        "missing image",
        "POST",
        "/v1/identify",
        {"json": {"gallery": "people"}},
        422,
        "missing_field",
    ),
    (
        "verify without second face",
        "POST",
        "/v1/verify",
        {"files": {"image1": "face"}},
        422,
        "missing_field",
    ),
    (
        "missing gallery",
        "POST",
        "/v1/identify",
        {"files": {"image": "face"}},
        422,
        "validation_error",
    ),
    (
        "unknown option",
        "POST",
        "/v1/identify",
        {"files": {"image": "face"}, "data": {"gallery": "people", "top": "3"}},
        422,
        "validation_error",
    ),
    (
        "invalid subject id",
        "GET",
        "/v1/galleries/people/subjects/bad%20id!",
        {},
        422,
        "validation_error",
    ),
    (
        "subject without id",
        "POST",
        "/v1/galleries/people/subjects",
        {"json": {"metadata": {"a": 1}}},
        422,
        "validation_error",
    ),
    (
        "metadata not an object",
        "PATCH",
        "/v1/galleries/people/subjects/abel",
        {"json": {"metadata": [1, 2]}},
        422,
        "validation_error",
    ),
    (
        "missing api key",
        "POST",
        "/v1/identify",
        {"files": {"image": "face"}, "data": {"gallery": "people"}, "headers": {"X-API-Key": ""}},
        401,
        "unauthorized",
    ),
    (
        "wrong api key",
        "DELETE",
        "/v1/galleries/people",
        {"headers": {"X-API-Key": "alpha-key-0124"}},
        403,
        "forbidden",
    ),
    ("unknown route", "GET", "/v1/nothing-here", {}, 404, "not_found"),
    ("wrong method", "DELETE", "/v1/verify", {}, 405, "method_not_allowed"),
    (
        "duplicate subject id is idempotent",
        "POST",
        "/v1/galleries/people/subjects",
        {"json": {"subject_id": "abel", "metadata": {"name": "someone else"}}},
        200,
        None,
    ),
]


def _request_kwargs(kwargs: dict, images: dict[str, bytes]) -> dict:
    out = dict(kwargs)
    files = kwargs.get("files")
    if isinstance(files, dict):
        out["files"] = {
            k: (k + ".jpg", images[v] if isinstance(v, str) else v) for k, v in files.items()
        }
    elif isinstance(files, list):
        out["files"] = [(k, (k + ".jpg", images[v])) for k, v in files]
    if kwargs.get("content") == "chunked":
        chunk = b" " * 65536
        out["content"] = iter([chunk] * 30)  # ~2 MB, no Content-Length
    return out


@pytest.mark.timeout(300)
def test_bad_requests_get_typed_errors_and_change_nothing(server, client, images):
    client.post(
        "/v1/galleries/people/subjects",
        json={"subject_id": "abel", "metadata": {"name": "Abel Pacheco"}},
    )
    if not client.get("/v1/galleries/people/subjects/abel").json()["faces"]:
        assert (
            client.post(
                "/v1/galleries/people/subjects/abel/faces", files={"image": images["face"]}
            ).status_code
            == 201
        )
    client.post("/v1/galleries/people/subjects", json={"subject_id": "faceless"})
    _quality_images(server, images)
    # a gallery (and subject) that belongs to another recognition model
    server.state.gallery.upsert_subject("legacy", "old", None, "other-model@0123456789ab")

    before = _snapshot(server, client)
    failures = []
    for name, method, url, kwargs, status, code in CASES:
        r = client.request(method, url, **_request_kwargs(kwargs, images))
        try:
            body = r.json()
        except ValueError:
            body = {"raw": r.text[:200]}
        got_code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        if r.status_code != status or (code is not None and got_code != code):
            failures.append(f"{name}: expected {status} {code}, got {r.status_code} {body}")
        elif code is not None:
            assert set(body) == {"error"} and body["error"]["message"], name
    assert not failures, "\n".join(failures)
    assert len(CASES) >= 20

    after = _snapshot(server, client)
    assert after == before, "a refused request changed the gallery"
    subject = client.get("/v1/galleries/people/subjects/abel").json()
    assert subject["metadata"] == {"name": "Abel Pacheco"}

    metrics = httpx.get(f"{server.base_url}/metrics").text
    for reason in ("no_face", "corrupt_image", "request_too_large", "unauthorized"):
        assert f'facegate_rejects_total{{reason="{reason}"}}' in metrics, reason
    assert 'status="500"' not in metrics


def test_a_new_gallery_reports_the_served_models_dimension(server, client):
    dim = 128  # mobilefacenet_peer_128d's card and output (MANIFEST.md)
    created = client.put("/v1/galleries/fresh-dim")
    assert created.status_code == 201 and created.json()["dim"] == dim
    assert created.json()["faces"] == 0
    subject = client.post("/v1/galleries/auto-dim/subjects", json={"subject_id": "s"})
    assert subject.status_code == 201
    assert client.get("/v1/galleries/auto-dim").json()["dim"] == dim
    listed = {g["name"]: g["dim"] for g in client.get("/v1/galleries").json()["galleries"]}
    assert listed["fresh-dim"] == listed["auto-dim"] == dim
