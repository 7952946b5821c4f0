"""``POST /v1/galleries/{g}/faces`` (bulk enrolment) against real servers on 127.0.0.1,
on both store backends, with real LFW photos and the reference models.

Per-item answers (good photos, bad base64, bad subject id, no image, several faces, a URL
from a host not on the allow-list), idempotent retries by photo sha256, multipart items,
the item bound, and what a client sees when the server is killed mid-request: either
nothing or everything of the request was written, and sending it again completes it
without duplicates.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
import time

import cv2
import httpx
import numpy as np
import pytest

from service.config import Settings
from service.gallery.backends import open_store
from tests.conftest import LFW, SHARED_MODELS, photo
from tests.support.service import InProcessServer, ServeProcess

PEOPLE = ["Abdoulaye_Wade", "Angela_Merkel", "Arianna_Huffington", "Alan_Greenspan"]
MAX_ITEMS = 12


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def two_faces() -> bytes:
    images = [
        cv2.imdecode(np.frombuffer(photo(name, 1), np.uint8), cv2.IMREAD_COLOR)
        for name in PEOPLE[:2]
    ]
    return cv2.imencode(".png", np.hstack(images))[1].tobytes()


@pytest.fixture
def server(tmp_path, store_url):
    settings = Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer="mobilefacenet_peer_128d",
        providers=["CPUExecutionProvider"],
        faiss_gpu=False,
        data_dir=tmp_path / "data",
        store_url=store_url,
        bulk_max_items=MAX_ITEMS,
        sync_interval_s=0.05,
    )
    running = InProcessServer(settings).start()
    yield running
    running.stop()


def codes(answer: dict) -> list:
    return [item.get("error", {}).get("code") for item in answer["items"]]


@pytest.mark.timeout(300)
def test_bulk_enrolment(server):
    items = [
        {"subject_id": name, "image": b64(photo(name, 1)), "metadata": {"n": i}}
        for i, name in enumerate(PEOPLE)
    ]
    items += [
        {"subject_id": "x", "image": "not base64!"},
        {"subject_id": "bad/id", "image": b64(photo(PEOPLE[0], 2))},
        {"subject_id": "x", "image": b64(b"GIF89a not a photo")},
        {"subject_id": "x", "image": b64(two_faces())},
        {"subject_id": "x", "image_url": "http://127.0.0.1:9/a.jpg"},
        {"subject_id": "x"},
    ]
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        r = client.post("/v1/galleries/staff/faces", json={"items": items})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert codes(answer) == [None] * 4 + [
            "invalid_base64",
            "invalid_input",
            "unsupported_image_type",
            "multiple_faces",
            "url_not_allowed",
            "invalid_input",
        ]
        assert (answer["enrolled"], answer["already_enrolled"], answer["refused"]) == (4, 0, 6)
        first = answer["items"][:4]
        assert all(item["created"] and item["quality"]["det_score"] > 0.8 for item in first)
        assert [item["index"] for item in answer["items"]] == list(range(len(items)))
        subject = client.get(f"/v1/galleries/staff/subjects/{PEOPLE[1]}").json()
        assert subject["metadata"] == {"n": 1}
        assert [f["face_id"] for f in subject["faces"]] == [first[1]["face_id"]]
        assert client.get("/v1/galleries/staff/subjects/x").status_code == 404

        # the same request again (a client that lost the answer): nothing is added twice
        again = client.post("/v1/galleries/staff/faces", json={"items": items[:4]}).json()
        assert [(i["face_id"], i["created"]) for i in again["items"]] == [
            (item["face_id"], False) for item in first
        ]
        assert client.get("/v1/galleries/staff").json()["faces"] == 4

        # multipart: each item starts with its subject_id part
        parts = []
        for name in PEOPLE:
            parts += [("subject_id", (None, name)), ("image", ("p.jpg", photo(name, 2)))]
        parts += [
            ("subject_id", (None, "Nobody")),
            ("metadata", (None, '{"new": true}')),
            ("image", ("bad.jpg", photo(PEOPLE[0], 3)[:400])),
        ]
        r = client.post("/v1/galleries/staff/faces", files=parts)
        assert r.status_code == 200, r.text
        assert codes(r.json()) == [None] * 4 + ["corrupt_image"]
        assert client.get("/v1/galleries/staff").json()["faces"] == 8

        # the bulk-enrolled faces are searchable at once
        for name in PEOPLE:
            r = client.post(
                "/v1/identify",
                data={"gallery": "staff"},
                files={"image": ("probe.jpg", photo(name, 3))},
            )
            assert r.json()["faces"][0]["match"] == name

        # whole-request refusals change nothing
        head = server.state.gallery.store.head_seq()
        many = [{"subject_id": "s", "image": b64(photo(PEOPLE[0], 1))}] * (MAX_ITEMS + 1)
        r = client.post("/v1/galleries/staff/faces", json={"items": many})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_items"
        many_parts = [("subject_id", (None, "s"))] * (MAX_ITEMS + 1)
        r = client.post("/v1/galleries/staff/faces", files=many_parts)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_items"
        r = client.post("/v1/galleries/staff/faces", json={"items": []})
        assert r.status_code == 422
        r = client.post(
            "/v1/galleries/staff/faces", content=b"x", headers={"content-type": "text/plain"}
        )
        assert r.status_code == 415
        server.state.gallery.create_gallery("foreign", "another-model@000000000000")
        r = client.post("/v1/galleries/foreign/faces", json={"items": items[:1]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_mismatch"
        assert server.state.gallery.store.head_seq() == head

        # enabled quality rules refuse faces, here as in single enrolment
        server.state.settings.enroll_max_roll_deg = 1e-9
        try:
            r = client.post(
                "/v1/galleries/staff/faces",
                json={"items": [{"subject_id": "y", "image": b64(photo(PEOPLE[3], 4))}]},
            )
            assert codes(r.json()) == ["face_tilted"]
            client.post("/v1/galleries/staff/subjects", json={"subject_id": "y"})
            r = client.post(
                "/v1/galleries/staff/subjects/y/faces",
                files={"image": ("y.jpg", photo(PEOPLE[3], 4))},
            )
            assert r.status_code == 422 and r.json()["error"]["code"] == "face_tilted"
        finally:
            server.state.settings.enroll_max_roll_deg = 0.0


def face_count(store_url: str) -> int:
    store = open_store(store_url)
    try:
        return sum(g["faces"] for g in store.stats())
    finally:
        store.close()


@pytest.mark.timeout(300)
def test_bulk_request_killed_mid_way_is_all_or_nothing(tmp_path, store_url, record_property):
    """kill -9 while a bulk request is being processed: after a restart the gallery holds
    none or all of its faces, and the same request sent again leaves exactly all of them."""
    names = sorted(p.name for p in (LFW / "images").iterdir() if len(list(p.glob("*.jpg"))) >= 2)[
        :MAX_ITEMS
    ]
    items = [{"subject_id": name, "image": b64(photo(name, 1))} for name in names]
    env = {
        "FACEGATE_STORE_URL": store_url,
        "FACEGATE_BULK_MAX_ITEMS": str(MAX_ITEMS),
        "FACEGATE_FAISS_GPU": "false",
    }
    serve = ServeProcess(tmp_path / "data", env=env).start()
    outcome: dict = {}

    def send() -> None:
        try:
            with httpx.Client(base_url=serve.base_url, timeout=120) as client:
                outcome["response"] = client.post(
                    "/v1/galleries/staff/faces", json={"items": items}
                )
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.3)  # the request is in flight: being read, analysed or written
    os.kill(serve.proc.pid, signal.SIGKILL)
    sender.join(60)
    serve.proc.wait(10)
    serve.proc = None
    if "response" in outcome:  # the server answered before it died
        assert outcome["response"].status_code == 200
    written = face_count(store_url)
    record_property("faces_after_kill", written)
    record_property("answered_before_kill", "response" in outcome)
    serve = ServeProcess(tmp_path / "data", env=env).start()
    try:
        with httpx.Client(base_url=serve.base_url, timeout=120) as client:
            r = client.post("/v1/galleries/staff/faces", json={"items": items})
            assert r.status_code == 200, r.text
            answer = r.json()
            accepted = answer["enrolled"] + answer["already_enrolled"]
            assert written in (0, accepted), (written, accepted)
            assert answer["already_enrolled"] == written
            assert accepted >= MAX_ITEMS - 2  # LFW first photos: nearly all single faces
            assert client.get("/v1/galleries/staff").json()["faces"] == accepted
    finally:
        serve.stop()
