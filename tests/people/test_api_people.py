"""People discovery through real servers on 127.0.0.1 (one SQLite store, two replicas on
it), with insightface's group photo, real LFW photos and the reference models.

Every photo's faces are stored (the same photo twice adds nothing), clustering groups
three people's photos precisely and never puts two faces of one photo together (photos
built with two different people side by side), a gallery mixes an enrolled subject (faces
assigned to it automatically, found by /v1/identify) with discovered clusters, corrections
(name, merge, split, move, remove) survive a rerun and "not this person" sticks, a
correction is visible on the second replica, scoped keys refuse another gallery's
clusters, and bad input is refused with its error and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import time

import cv2
import httpx
import numpy as np
import pytest

from service.config import Settings
from tests.conftest import GROUP_PHOTO, SHARED_MODELS, photo
from tests.support.service import InProcessServer

#: three LFW people with many photos, and a fourth enrolled as a subject beforehand
PEOPLE = ["Tony_Blair", "Silvio_Berlusconi", "Jean_Chretien"]
ENROLLED = "Hans_Blix"
PER_PERSON = 6
KEY, OTHER_KEY = "people-key-0123", "other-key-4567"


def side_by_side(left: bytes, right: bytes) -> bytes:
    images = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in (left, right)]
    return cv2.imencode(".png", np.hstack(images))[1].tobytes()


def _keys_file(path) -> str:
    def entry(key_id, key, galleries, scopes=("identify", "enrol", "delete")):
        digest = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        return {"id": key_id, "hash": digest, "scopes": list(scopes), "galleries": galleries}

    path.write_text(
        json.dumps(
            {
                "keys": [
                    entry("lib", KEY, ["*"], ("identify", "enrol", "delete", "admin")),
                    entry("other", OTHER_KEY, ["other"]),
                ]
            }
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("people")
    keys = _keys_file(root / "keys.json")

    def settings(name):
        return Settings(
            models_dir=SHARED_MODELS,
            detector="yunet_2023mar",
            recognizer="mobilefacenet_peer_128d",
            providers=["CPUExecutionProvider"],
            faiss_gpu=False,
            data_dir=root / name,
            store_url=f"sqlite:///{root / 'store.sqlite3'}",
            sync_interval_s=0.05,
            api_keys_file=keys,
            people_thumbnails=True,
        )

    first = InProcessServer(settings("a")).start()
    second = InProcessServer(settings("b")).start()
    yield first, second
    second.stop()
    first.stop()


@pytest.fixture(scope="module")
def api(servers):
    with httpx.Client(
        base_url=servers[0].base_url, timeout=120, headers={"X-API-Key": KEY}
    ) as client:
        yield client


def post_photo(api, gallery: str, data: bytes):
    return api.post(f"/v1/galleries/{gallery}/photos", files={"image": ("p.jpg", data)})


def clusters(api, gallery: str) -> list[dict]:
    r = api.get(f"/v1/galleries/{gallery}/clusters", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()["clusters"]


@pytest.fixture(scope="module")
def library(api):
    """Gallery ``lib``: one enrolled subject, then PER_PERSON photos of each of PEOPLE, two
    photos of two people side by side, three more photos of the enrolled subject.  Returns
    the truth: photo face id -> person."""
    assert api.put("/v1/galleries/lib").status_code == 201
    api.post("/v1/galleries/lib/subjects", json={"subject_id": "rumsfeld"})
    r = api.post(
        "/v1/galleries/lib/subjects/rumsfeld/faces", files={"image": ("e.jpg", photo(ENROLLED, 1))}
    )
    assert r.status_code == 201, r.text
    truth: dict[int, str] = {}
    for name in PEOPLE:
        for k in range(1, PER_PERSON + 1):
            r = post_photo(api, "lib", photo(name, k))
            assert r.status_code == 201, r.text
            main = max(r.json()["faces"], key=lambda f: f["quality"]["face_size_px"])
            truth[main["face_id"]] = name
    for left, right, k in ((PEOPLE[0], PEOPLE[1], 7), (PEOPLE[1], PEOPLE[2], 8)):
        r = post_photo(api, "lib", side_by_side(photo(left, k), photo(right, k)))
        assert r.status_code == 201, r.text
        faces = sorted(r.json()["faces"], key=lambda f: f["quality"]["face_size_px"])[-2:]
        faces.sort(key=lambda f: f["box"][0])
        truth[faces[0]["face_id"]], truth[faces[1]["face_id"]] = left, right
    auto = []
    for k in (2, 3, 4):
        r = post_photo(api, "lib", photo(ENROLLED, k))
        assert r.status_code == 201, r.text
        auto += r.json()["faces"]
    return {"truth": truth, "auto": auto}


def log_since(servers, seq: int) -> list[tuple[str, str]]:
    """The store's change-log entries after ``seq``: (op, gallery)."""
    return [(c.op, c.gallery) for c in servers[0].state.gallery.store.changes_after(seq)]


def second_applies(servers, seq: int) -> None:
    """The second replica's follower applies the log up to ``seq`` (within 2 s) and stays
    ready (an entry it could not apply would fail its sync)."""
    deadline = time.monotonic() + 2.0
    while True:
        sync = httpx.get(f"{servers[1].base_url}/readyz", timeout=10).json()["sync"]
        if sync["applied_seq"] >= seq or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sync["applied_seq"] >= seq and sync["ready"], sync


def test_group_photo_every_face_and_the_same_photo_twice(api):
    assert api.put("/v1/galleries/group").status_code == 201
    data = GROUP_PHOTO.read_bytes()
    first = post_photo(api, "group", data)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["photo_id"] == hashlib.sha256(data).hexdigest()
    faces = body["faces"]
    assert len(faces) == 6  # insightface's t1.jpg shows six people
    assert len({f["face_id"] for f in faces}) == 6
    for face in faces:
        x1, y1, x2, y2 = face["box"]
        assert x2 > x1 and y2 > y1
        assert len(face["landmarks"]) == 5
        assert face["subject_id"] is None and face["cluster_id"] is None
        assert face["clusterable"] == (not face["excluded"])
    again = post_photo(api, "group", data)
    assert again.status_code == 200
    assert [f["face_id"] for f in again.json()["faces"]] == [f["face_id"] for f in faces]
    run = api.post("/v1/galleries/group/clusters/run").json()
    assert run["clusters_created"] == 0  # six different people of one photo
    assert clusters(api, "group") == []
    thumb = api.get(f"/v1/galleries/group/photo-faces/{faces[0]['face_id']}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(thumb.content, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (
        112,
        112,
    )


def test_automatic_assignment_to_an_enrolled_subject(api, library):
    main = [f for f in library["auto"] if f["clusterable"]]
    assigned = [f for f in main if f["subject_id"] == "rumsfeld"]
    assert assigned, main
    for face in assigned:
        assert face["assignment"] == "automatic"
        assert face["enrolled_face_id"] is not None
    # an assigned face is searchable: identify with its own photo finds it
    r = api.post(
        "/v1/identify", data={"gallery": "lib"}, files={"image": ("q.jpg", photo(ENROLLED, 2))}
    )
    assert r.status_code == 200, r.text
    best = r.json()["faces"][0]
    assert best["match"] == "rumsfeld"
    assert best["candidates"][0]["face_id"] in {f["enrolled_face_id"] for f in assigned}


def test_clustering_is_precise_and_respects_photos(api, servers, library):
    truth = library["truth"]
    head = servers[0].state.gallery.store.head_seq()
    run = api.post("/v1/galleries/lib/clusters/run")
    assert run.status_code == 200, run.text
    # creating clusters changes no index, yet it is logged, and the other replica follows
    assert run.json()["clusters_created"] > 0
    assert log_since(servers, head) == [("people", "lib")]
    second_applies(servers, head + 1)
    params = run.json()["params"]
    assert params["link_point"] == "fmr_1e-2"
    assert params["link"] >= 0.267542  # never under the card's fmr_1e-2 threshold
    found = clusters(api, "lib")
    assert found, run.json()
    sizes = [c["size"] for c in found]
    assert sizes == sorted(sizes, reverse=True)
    covered = 0
    for cluster in found:
        people = {truth.get(f) for f in cluster["face_ids"]}
        assert len(people) == 1, cluster  # never two people in one cluster
        faces = [api.get(f"/v1/galleries/lib/photo-faces/{f}").json() for f in cluster["face_ids"]]
        photos = [f["photo_id"] for f in faces]
        assert len(photos) == len(set(photos)), cluster  # never two faces of one photo
        assert cluster["representative_face_id"] in cluster["face_ids"]
        covered += sum(1 for f in cluster["face_ids"] if f in truth)
    assert covered >= 0.6 * len(truth)  # most faces found their person
    # the automatically assigned faces are the subject's, not clustered again
    auto = {f["face_id"] for f in library["auto"] if f["subject_id"]}
    assert not auto & {f for c in found for f in c["face_ids"]}


def _cluster_of(api, name: str, truth: dict) -> dict:
    best = None
    for cluster in clusters(api, "lib"):
        mine = {truth.get(f) for f in cluster["face_ids"]} == {name}
        if mine and (best is None or cluster["size"] > best["size"]):
            best = cluster
    assert best is not None, name
    return best


def test_corrections_survive_a_rerun(api, servers, library):
    truth = library["truth"]
    bush = _cluster_of(api, PEOPLE[0], truth)
    # name a cluster: its faces become a subject's, searchable on the other replica too
    r = api.post(
        f"/v1/galleries/lib/clusters/{bush['cluster_id']}/name", json={"subject_id": "bush"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["subject_id"] == "bush" and r.json()["origin"] == "manual"
    face = api.get(f"/v1/galleries/lib/photo-faces/{bush['face_ids'][0]}").json()
    assert face["subject_id"] == "bush" and face["assignment"] == "manual"
    (record,) = api.get("/v1/audit", params={"action": "name_cluster"}).json()["records"]
    assert record["key_id"] == "lib" and record["subject_ids"] == ["bush"]
    assert len(record["face_ids"]) == bush["size"]  # the enrolled faces it added
    with httpx.Client(
        base_url=servers[1].base_url, timeout=60, headers={"X-API-Key": KEY}
    ) as other:
        deadline = time.monotonic() + 2.0
        while True:
            r = other.post(
                "/v1/identify",
                data={"gallery": "lib"},
                files={"image": ("q.jpg", photo(PEOPLE[0], 1))},
            )
            if r.json()["faces"][0]["match"] == "bush" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.json()["faces"][0]["match"] == "bush", r.text
        listed = {
            c["cluster_id"]: c for c in other.get("/v1/galleries/lib/clusters").json()["clusters"]
        }
        assert listed[bush["cluster_id"]]["subject_id"] == "bush"

    # split a cluster and merge it back (unnamed clusters: pure cluster changes)
    powell = _cluster_of(api, PEOPLE[1], truth)
    assert powell["size"] >= 3 and powell["subject_id"] is None
    part = powell["face_ids"][:1]
    head = servers[0].state.gallery.store.head_seq()
    r = api.post(
        f"/v1/galleries/lib/clusters/{powell['cluster_id']}/split", json={"face_ids": part}
    )
    assert r.status_code == 200, r.text
    split_off = r.json()
    assert split_off["face_ids"] == part
    assert log_since(servers, head) == [("people", "lib")]  # logged with the split
    second_applies(servers, head + 1)
    with httpx.Client(
        base_url=servers[1].base_url, timeout=60, headers={"X-API-Key": KEY}
    ) as other:
        seen = other.get(f"/v1/galleries/lib/clusters/{split_off['cluster_id']}")
        assert seen.status_code == 200 and seen.json()["face_ids"] == part
    # no enrolled face changed, and still its audit record, written with the split
    (record,) = api.get("/v1/audit", params={"action": "split_cluster"}).json()["records"]
    assert record["face_ids"] == part and record["result"] == "ok"
    r = api.post(
        f"/v1/galleries/lib/clusters/{powell['cluster_id']}/merge",
        json={"source": split_off["cluster_id"]},
    )
    assert r.status_code == 200, r.text
    assert sorted(r.json()["face_ids"]) == sorted(powell["face_ids"])
    assert api.get(f"/v1/galleries/lib/clusters/{split_off['cluster_id']}").status_code == 404
    assert log_since(servers, head + 1) == [("people", "lib")]
    # split again, and move the face back between the two unnamed clusters
    r = api.post(
        f"/v1/galleries/lib/clusters/{powell['cluster_id']}/split", json={"face_ids": part}
    )
    assert r.status_code == 200, r.text
    r = api.post(
        f"/v1/galleries/lib/photo-faces/{part[0]}/move",
        json={"cluster_id": powell["cluster_id"]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["cluster_id"] == powell["cluster_id"]
    assert log_since(servers, head + 2) == [("people", "lib")] * 2
    second_applies(servers, head + 4)

    # "not this person" sticks: remove a face of the named cluster
    removed = bush["face_ids"][-1]
    r = api.post(f"/v1/galleries/lib/photo-faces/{removed}/remove")
    assert r.status_code == 200, r.text
    assert r.json()["cluster_id"] is None and r.json()["subject_id"] is None

    # move a face to the enrolled subject by hand
    blair = _cluster_of(api, PEOPLE[2], truth)
    moved = blair["face_ids"][0]
    r = api.post(f"/v1/galleries/lib/photo-faces/{moved}/move", json={"subject_id": "rumsfeld"})
    assert r.status_code == 200, r.text
    assert r.json()["subject_id"] == "rumsfeld" and r.json()["assignment"] == "manual"

    before = {c["cluster_id"]: c for c in clusters(api, "lib")}
    rerun = api.post("/v1/galleries/lib/clusters/run")
    assert rerun.status_code == 200, rerun.text
    after = {c["cluster_id"]: c for c in clusters(api, "lib")}
    assert after[bush["cluster_id"]]["subject_id"] == "bush"  # stays named
    assert set(before[bush["cluster_id"]]["face_ids"]) <= set(after[bush["cluster_id"]]["face_ids"])
    assert removed not in after[bush["cluster_id"]]["face_ids"]  # never back
    assert api.get(f"/v1/galleries/lib/photo-faces/{removed}").json()["subject_id"] != "bush"
    assert sorted(after[powell["cluster_id"]]["face_ids"]) == sorted(
        powell["face_ids"]
    )  # merge kept
    assert api.get(f"/v1/galleries/lib/photo-faces/{moved}").json()["subject_id"] == "rumsfeld"
    for cluster_id, cluster in before.items():
        assert set(cluster["face_ids"]) <= set(after[cluster_id]["face_ids"])  # nothing reshuffled

    # a new photo of a named person joins the named cluster on the next run (or at upload)
    r = post_photo(api, "lib", photo(PEOPLE[0], 9))
    new = max(r.json()["faces"], key=lambda f: f["quality"]["face_size_px"])
    api.post("/v1/galleries/lib/clusters/run")
    now = api.get(f"/v1/galleries/lib/photo-faces/{new['face_id']}").json()
    assert now["subject_id"] in (None, "bush")  # never another person
    if now["cluster_id"] is not None:
        assert now["cluster_id"] == bush["cluster_id"]


def test_export_and_restore_keep_photos_and_clusters(api, servers, library, tmp_path):
    import contextlib
    import io

    from service.cli import main as cli_main
    from tests.support.service import TEST_MODELS

    r = api.get("/v1/galleries/lib/export")
    assert r.status_code == 200, r.text
    (tmp_path / "lib.gz").write_bytes(r.content)
    out = io.StringIO()
    argv = ["gallery", "restore", str(tmp_path / "lib.gz"), "--gallery", "copy"]
    argv += ["--store-url", servers[0].state.settings.resolved_store_url]
    argv += ["--models-dir", TEST_MODELS["FACEGATE_MODELS_DIR"]]
    argv += ["--recognizer", TEST_MODELS["FACEGATE_RECOGNIZER"]]
    with contextlib.redirect_stdout(out):
        assert cli_main(argv) == 0, out.getvalue()
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    assert summary["people"]["photo_face"] > 0 and summary["people"]["cluster"] > 0

    def shape(gallery):
        found = []
        for cluster in clusters(api, gallery):
            faces = [
                api.get(f"/v1/galleries/{gallery}/photo-faces/{f}").json()
                for f in cluster["face_ids"]
            ]
            found.append(
                (
                    cluster["size"],
                    cluster["subject_id"],
                    cluster["origin"],
                    sorted((f["photo_id"], f["subject_id"], f["assignment"]) for f in faces),
                )
            )
        return sorted(found, key=repr)

    deadline = time.monotonic() + 2.0  # the server follows the restore's change log
    while api.get("/v1/galleries/copy").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shape("copy") == shape("lib")
    r = api.post(
        "/v1/identify", data={"gallery": "copy"}, files={"image": ("q.jpg", photo(PEOPLE[0], 1))}
    )
    assert r.json()["faces"][0]["match"] == "bush"


def test_bad_input_changes_nothing(api, library):
    api.post("/v1/galleries/lib/clusters/run")
    before = clusters(api, "lib")
    target = before[0]["cluster_id"]
    assert api.put("/v1/galleries/elsewhere").status_code in (200, 201)
    r = post_photo(api, "elsewhere", photo(PEOPLE[0], 10))
    stranger = r.json()["faces"][0]["face_id"]
    cases = [
        (
            "post",
            "/v1/galleries/lib/clusters/c999999/name",
            {"subject_id": "x"},
            404,
            "cluster_not_found",
        ),
        (
            "post",
            "/v1/galleries/lib/clusters/nonsense/merge",
            {"source": target},
            404,
            "cluster_not_found",
        ),
        (
            "post",
            f"/v1/galleries/lib/clusters/{target}/merge",
            {"source": target},
            422,
            "invalid_input",
        ),
        (
            "post",
            f"/v1/galleries/lib/photo-faces/{stranger}/move",
            {"cluster_id": target},
            404,
            "face_not_found",
        ),
        ("post", f"/v1/galleries/lib/photo-faces/{stranger}/remove", None, 404, "face_not_found"),
        (
            "post",
            f"/v1/galleries/lib/clusters/{target}/split",
            {"face_ids": [stranger]},
            422,
            "invalid_input",
        ),
        ("post", f"/v1/galleries/lib/clusters/{target}/name", {"subject_id": "bad/id"}, 422, None),
        ("get", "/v1/galleries/lib/clusters?cursor=bogus", None, 422, "invalid_cursor"),
        ("post", "/v1/galleries/nowhere/clusters/run", None, 404, "gallery_not_found"),
    ]
    for method, url, body, code, error in cases:
        r = api.request(method.upper(), url, json=body)
        assert r.status_code == code, (url, r.text)
        if error is not None:
            assert r.json()["error"]["code"] == error, (url, r.text)
    r = post_photo(api, "lib", b"GIF89a not a photo")
    assert r.status_code in (400, 415), r.text
    assert clusters(api, "lib") == before


def test_scoped_keys_refuse_another_gallerys_clusters(servers, library):
    with httpx.Client(
        base_url=servers[0].base_url, timeout=60, headers={"X-API-Key": OTHER_KEY}
    ) as other:
        for method, url in (
            ("GET", "/v1/galleries/lib/clusters"),
            ("POST", "/v1/galleries/lib/clusters/run"),
            ("POST", "/v1/galleries/lib/clusters/c1/merge"),
            ("GET", "/v1/galleries/lib/photo-faces/1"),
        ):
            r = other.request(method, url, json={"source": "c2"} if "merge" in url else None)
            assert r.status_code == 403, (url, r.text)
