"""Re-enrolment after a recognizer upgrade, end to end against real ``facegate serve`` processes.

One data directory (SQLite store) sees three servers in turn: recognizer A
(the project's ``facegate_mfn_cosface``) without stored photos enrols gallery
"plain"; recognizer A with ``FACEGATE_STORE_IMAGES=true`` enrols real LFW people
into gallery "old" (one photo shrunk so that its face passes A's size floor but
not the one B runs with); recognizer B (``mobilefacenet_peer_128d``) refuses "old"
(409 ``model_mismatch``), re-enrols it into "new" through
``POST /v1/galleries/new/reenrol`` and identifies other photos of the people there.
Then, with every server stopped, ``facegate gallery reenrol`` does the same on the
store directly.  Detector: ``yunet_2023mar`` throughout.
"""

from __future__ import annotations

import json

import cv2
import httpx
import numpy as np
import pytest

from service.cli import main as cli_main
from service.gallery import GalleryService
from service.gallery.backends import open_store
from tests.conftest import SHARED_MODELS, photo
from tests.support.service import ServeProcess

MODEL_A = "facegate_mfn_cosface"
MODEL_B = "mobilefacenet_peer_128d"
#: LFW people whose first photos show one face each
PEOPLE = ["Abdoulaye_Wade", "Angela_Merkel", "Arianna_Huffington", "Alan_Greenspan"]
SMALL_SCALE = 0.45  # the shrunk photo: face about 50 px
B_MIN_FACE = 70  # B's enrolment floor (A keeps the default 40 px)


def shrunk(data: bytes) -> bytes:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    small = cv2.resize(image, None, fx=SMALL_SCALE, fy=SMALL_SCALE, interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def serve(data_dir, recognizer: str, **env: str) -> ServeProcess:
    return ServeProcess(
        data_dir, env={"FACEGATE_RECOGNIZER": recognizer, "FACEGATE_FAISS_GPU": "false", **env}
    ).start()


def enrol(client: httpx.Client, gallery: str, subject_id: str, image: bytes) -> dict:
    r = client.post(
        f"/v1/galleries/{gallery}/subjects",
        json={"subject_id": subject_id, "metadata": {"name": subject_id.lower()}},
    )
    assert r.status_code in (200, 201), r.text
    r = client.post(
        f"/v1/galleries/{gallery}/subjects/{subject_id}/faces", files={"image": ("face.jpg", image)}
    )
    assert r.status_code == 201, r.text
    return r.json()


def reenrol(client: httpx.Client, target: str, source: str) -> httpx.Response:
    return client.post(f"/v1/galleries/{target}/reenrol", json={"source": source})


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


@pytest.mark.timeout(300)
def test_reenrol_after_recognizer_upgrade(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"

    # --- recognizer A, photos not stored: gallery "plain" ----------------------------------
    server = serve(data_dir, MODEL_A)
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        enrol(client, "plain", PEOPLE[0], photo(PEOPLE[0], 1))
    server.stop()

    # --- recognizer A, photos stored: gallery "old" ------------------------------------------
    server = serve(data_dir, MODEL_A, FACEGATE_STORE_IMAGES="true")
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        old_faces = {}  # face id in "old" -> subject
        for name in PEOPLE:
            old_faces[enrol(client, "old", name, photo(name, 1))["face_id"]] = name
        old_faces[enrol(client, "old", PEOPLE[1], photo(PEOPLE[1], 2))["face_id"]] = PEOPLE[1]
        small = enrol(client, "old", PEOPLE[2], shrunk(photo(PEOPLE[2], 2)))
        assert 40 <= small["quality"]["face_size_px"] < B_MIN_FACE, small["quality"]
        old_faces[small["face_id"]] = PEOPLE[2]
        model_a = client.get("/v1/galleries/old").json()["model_id"]
    server.stop()

    # --- recognizer B: "old" is refused, re-enrolled into "new" ---------------------------
    server = serve(
        data_dir,
        MODEL_B,
        FACEGATE_STORE_IMAGES="true",
        FACEGATE_ENROLL_MIN_FACE_SIZE=str(B_MIN_FACE),
    )
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            r = client.post(
                "/v1/identify",
                files={"image": ("p.jpg", photo(PEOPLE[0], 3))},
                data={"gallery": "old"},
            )
            assert r.status_code == 409 and error_code(r) == "model_mismatch", r.text
            assert "/v1/galleries/NEW/reenrol" in r.json()["error"]["message"]

            r = reenrol(client, "new", "old")
            assert r.status_code == 200, r.text
            first = r.json()
            assert first["source"] == "old" and first["target"] == "new"
            assert first["model"] != model_a and first["model"].startswith(MODEL_B)
            assert first["subjects_copied"] == len(PEOPLE) and first["subjects_existing"] == 0
            assert first["faces_reenrolled"] == len(old_faces) - 1
            assert first["faces_skipped"] == 1 and first["faces_without_image"] == 0
            assert first["faces_already_reenrolled"] == 0
            [skipped] = first["skipped"]
            assert skipped["face_id"] == small["face_id"] and skipped["subject_id"] == PEOPLE[2]
            assert skipped["code"] == "face_too_small"

            new = client.get("/v1/galleries/new").json()
            assert new["model_id"] == first["model"]
            assert new["subjects"] == len(PEOPLE) and new["faces"] == len(old_faces) - 1
            subject = client.get(f"/v1/galleries/new/subjects/{PEOPLE[1]}").json()
            assert subject["metadata"] == {"name": PEOPLE[1].lower()}
            assert sorted(f["reenrolled_from"] for f in subject["faces"]) == sorted(
                fid for fid, name in old_faces.items() if name == PEOPLE[1]
            )

            for name in PEOPLE:  # another photo of each person is found in "new"
                r = client.post(
                    "/v1/identify",
                    files={"image": ("p.jpg", photo(name, 3))},
                    data={"gallery": "new"},
                )
                assert r.status_code == 200, r.text
                face = r.json()["faces"][0]
                assert face["candidates"][0]["subject_id"] == name, face["candidates"]
                assert face["match"] == name, face["candidates"]

            # again: nothing new; the refused photo is tried (and refused) again
            second = reenrol(client, "new", "old").json()
            assert second["subjects_copied"] == 0 and second["subjects_existing"] == len(PEOPLE)
            assert second["faces_reenrolled"] == 0
            assert second["faces_already_reenrolled"] == len(old_faces) - 1
            assert second["skipped"] == first["skipped"]
            assert client.get("/v1/galleries/new").json()["faces"] == len(old_faces) - 1

            r = reenrol(client, "new2", "plain")
            assert r.status_code == 409 and error_code(r) == "no_stored_images", r.text
            assert "FACEGATE_STORE_IMAGES" in r.json()["error"]["message"]
            assert client.get("/v1/galleries/new2").status_code == 404  # nothing written

            r = reenrol(client, "new2", "nowhere")
            assert r.status_code == 404 and error_code(r) == "gallery_not_found", r.text
            r = reenrol(client, "new", "new")
            assert r.status_code == 409 and error_code(r) == "conflict", r.text
            r = reenrol(client, "plain", "old")  # "plain" holds model A
            assert r.status_code == 409 and error_code(r) == "model_mismatch", r.text
            r = client.post("/v1/galleries/new/reenrol", json={"source": "old", "x": 1})
            assert r.status_code == 422, r.text
    finally:
        assert server.stop() in (0, -15), server.log()

    # --- the CLI on the stopped server's store ---------------------------------------------
    for key, value in {
        "FACEGATE_DATA_DIR": str(data_dir),
        "FACEGATE_STORE_URL": "",
        "FACEGATE_MODELS_DIR": str(SHARED_MODELS),
        "FACEGATE_DETECTOR": "yunet_2023mar",
        "FACEGATE_RECOGNIZER": MODEL_B,
        "FACEGATE_PROVIDERS": "CPUExecutionProvider",
        "FACEGATE_STORE_IMAGES": "true",
    }.items():
        monkeypatch.setenv(key, value)
    cli_report = run_cli(["--source", "old", "--target", "cli"])
    assert cli_report["subjects_copied"] == len(PEOPLE)
    assert cli_report["faces_reenrolled"] == len(old_faces)  # default 40 px floor: all pass
    assert cli_report["faces_skipped"] == 0 and cli_report["model"] == first["model"]
    again = run_cli(["--source", "old", "--target", "cli"])
    assert again["faces_reenrolled"] == 0
    assert again["faces_already_reenrolled"] == len(old_faces)
    assert (
        run_cli(["--source", "plain", "--target", "cli2"], code=3)["error"]["code"]
        == "no_stored_images"
    )

    store = open_store(f"sqlite:///{data_dir / 'gallery.sqlite3'}")
    try:
        assert store.reenrolled_sources("cli") == set(old_faces)
        head = store.head_seq()
        adds = [c for c in store.changes_after(0, 10_000) if c.gallery == "cli"]
        assert len(adds) == len(old_faces) and all(c.op == "add" for c in adds)
        assert head == max(c.seq for c in store.changes_after(0, 10_000))
    finally:
        store.close()

    # a server started afterwards serves "cli" (from the change log it replays)
    server = serve(data_dir, MODEL_B)
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            r = client.post(
                "/v1/identify",
                files={"image": ("p.jpg", photo(PEOPLE[3], 3))},
                data={"gallery": "cli"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["faces"][0]["match"] == PEOPLE[3]
    finally:
        server.stop()


def run_cli(args: list[str], code: int = 0) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["gallery", "reenrol", *args]) == code
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_offline_gallery_service_writes_no_snapshot(tmp_path):
    from service.config import Settings

    settings = Settings(data_dir=tmp_path, faiss_gpu=False)
    service = GalleryService.offline(settings)
    service.create_gallery("g", "m")
    service.stop()
    assert not (service.snapshot_dir / "manifest.json").exists()
