"""The gallery service over both store backends (SQLite file, throwaway PostgreSQL).

Embeddings here are random unit vectors: the gallery's behaviour (storage,
ranking, replication) does not depend on what produced them; the real-data
identification test lives in ``test_gallery_identify.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from service.config import Settings
from service.gallery import (
    FaceNotFound,
    GalleryModelMismatch,
    GalleryNotFound,
    GalleryService,
    InvalidEmbedding,
    InvalidInput,
    SubjectNotFound,
    open_gallery,
)
from service.gallery.backends import open_store
from service.gallery.schema import LATEST
from tests.conftest import REPO

DIM = 32
MODEL = "model-a"


def unit(rng: np.random.Generator, n: int | None = None, dim: int = DIM) -> np.ndarray:
    shape = (dim,) if n is None else (n, dim)
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def near(rng: np.random.Generator, v: np.ndarray, noise: float = 0.05) -> np.ndarray:
    x = v + noise * rng.standard_normal(v.shape).astype(np.float32)
    return (x / np.linalg.norm(x)).astype(np.float32)


def make_settings(tmp_path: Path, store_url: str, name: str = "a", **overrides) -> Settings:
    values = {
        "data_dir": tmp_path / f"replica-{name}",
        "store_url": store_url,
        "sync_interval_s": 0.05,
        "faiss_gpu": False,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def services(tmp_path, store_url):
    """Start gallery services on the test's store; all are stopped afterwards."""
    started: list[GalleryService] = []

    def start(name: str = "a", **overrides) -> GalleryService:
        service = open_gallery(make_settings(tmp_path, store_url, name, **overrides))
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def gallery(services) -> GalleryService:
    return services()


def assert_index_matches_store(service: GalleryService) -> None:
    for info in service.list_galleries():
        stored = service.store.face_ids(info["name"])
        assert np.array_equal(service.index_face_ids(info["name"]), stored), info["name"]


# --- galleries -------------------------------------------------------------------------


def test_create_gallery_is_idempotent_and_refuses_another_model(gallery):
    assert gallery.ready()
    created = gallery.create_gallery("staff", MODEL)
    assert created["name"] == "staff" and created["model_id"] == MODEL
    assert created["subjects"] == 0 and created["faces"] == 0 and created["created_at"]
    again = gallery.create_gallery("staff", MODEL)
    assert again["created_at"] == created["created_at"]
    with pytest.raises(GalleryModelMismatch) as exc:
        gallery.create_gallery("staff", "model-b")
    assert exc.value.code == "model_mismatch" and exc.value.status == 409
    assert "re-enrol" in exc.value.message
    assert [g["name"] for g in gallery.list_galleries()] == ["staff"]
    assert gallery.get_gallery("staff")["model_id"] == MODEL


def test_a_new_gallery_knows_its_dimension_before_its_first_face(services):
    rng = np.random.default_rng(3)
    first = services()
    assert first.create_gallery("known", MODEL, DIM)["dim"] == DIM
    assert first.get_gallery("known")["dim"] == DIM
    _, created = first.upsert_subject("auto", "s", None, MODEL, DIM)
    assert created and first.get_gallery("auto")["dim"] == DIM
    assert first.create_gallery("later", MODEL)["dim"] is None  # dimension unknown: first face
    with pytest.raises(InvalidInput):
        first.create_gallery("bad", MODEL, 0)
    first.upsert_subject("known", "s", None, MODEL)
    with pytest.raises(InvalidEmbedding):  # the stored dimension is enforced from the start
        first.add_face("known", "s", unit(rng, dim=DIM + 1), MODEL, {})
    assert first.search("known", unit(rng, 1), 3, MODEL) == [[]]
    second = services("b")  # another replica, built from the store
    assert {g["name"]: g["dim"] for g in second.list_galleries()} == {
        "auto": DIM,
        "known": DIM,
        "later": None,
    }
    face = first.add_face("known", "s", unit(rng), MODEL, {})
    second.catch_up()
    assert second.search("known", unit(rng, 1), 1, MODEL)[0][0]["face_id"] == face["face_id"]


def test_delete_gallery_removes_everything(gallery):
    rng = np.random.default_rng(1)
    gallery.upsert_subject("g", "s1", None, MODEL)
    face = gallery.add_face("g", "s1", unit(rng), MODEL, {})
    gallery.delete_gallery("g")
    for call in (
        lambda: gallery.get_gallery("g"),
        lambda: gallery.delete_gallery("g"),
        lambda: gallery.search("g", unit(rng, 1), 1, MODEL),
        lambda: gallery.get_subject("g", "s1"),
        lambda: gallery.delete_face("g", face["face_id"]),
    ):
        with pytest.raises(GalleryNotFound) as exc:
            call()
        assert exc.value.code == "gallery_not_found" and exc.value.status == 404
    # The name can be reused, even with another model: it is a new, empty gallery.
    gallery.upsert_subject("g", "s1", None, "model-b")
    assert gallery.get_gallery("g")["faces"] == 0
    assert gallery.search("g", unit(rng, 1), 3, "model-b") == [[]]
    assert gallery.list_galleries()[0]["model_id"] == "model-b"


# --- subjects --------------------------------------------------------------------------


def test_subject_crud_and_idempotent_creation(gallery):
    subject, created = gallery.upsert_subject("g", "alice", {"team": "red", "level": 2}, MODEL)
    assert created and subject["subject_id"] == "alice" and subject["faces"] == []
    assert subject["metadata"] == {"team": "red", "level": 2}
    assert gallery.get_gallery("g")["model_id"] == MODEL  # created on first use

    again, created = gallery.upsert_subject("g", "alice", {"team": "blue"}, MODEL)
    assert not created and again["metadata"] == {"team": "red", "level": 2}  # unchanged
    assert gallery.get_gallery("g")["subjects"] == 1

    updated = gallery.update_subject("g", "alice", {"team": "blue", "level": None, "x": [1]})
    assert updated["metadata"] == {"team": "blue", "x": [1]}
    assert updated["updated_at"] >= updated["created_at"]
    assert gallery.get_subject("g", "alice")["metadata"] == {"team": "blue", "x": [1]}

    with pytest.raises(GalleryModelMismatch):
        gallery.upsert_subject("g", "bob", None, "model-b")
    for call in (
        lambda: gallery.get_subject("g", "bob"),
        lambda: gallery.update_subject("g", "bob", {}),
        lambda: gallery.delete_subject("g", "bob"),
    ):
        with pytest.raises(SubjectNotFound) as exc:
            call()
        assert exc.value.code == "subject_not_found" and exc.value.status == 404
    with pytest.raises(InvalidInput):
        gallery.upsert_subject("g", "carol", {"bad": float("nan")}, MODEL)
    with pytest.raises(InvalidInput):
        gallery.upsert_subject("g", "", None, MODEL)
    with pytest.raises(InvalidInput):
        gallery.update_subject("g", "alice", ["not", "an", "object"])
    assert gallery.get_gallery("g")["subjects"] == 1

    assert gallery.delete_subject("g", "alice") == 0
    with pytest.raises(SubjectNotFound):
        gallery.get_subject("g", "alice")


def test_list_subjects_keyset_pagination(gallery):
    rng = np.random.default_rng(2)
    # ids of service.gallery.names whose code-point order differs from a locale's
    names = [f"person-{i:03d}" for i in range(25)] + ["Zed", "_under", "a:b"]
    for name in rng.permutation(names):
        gallery.upsert_subject("g", str(name), {"n": str(name)}, MODEL)
    face = gallery.add_face("g", "person-007", unit(rng), MODEL, {"sharpness": 1.5})

    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = gallery.list_subjects("g", 10, cursor)
        pages += 1
        seen += page
        if cursor is None:
            break
    assert pages == 3
    assert [s["subject_id"] for s in seen] == sorted(names)  # code-point order on both backends
    assert all(s["metadata"] == {"n": s["subject_id"]} for s in seen)
    person7 = next(s for s in seen if s["subject_id"] == "person-007")
    assert person7["faces"] == [
        {
            "face_id": face["face_id"],
            "created_at": face["created_at"],
            "quality": {"sharpness": 1.5},
        }
    ]
    exact, cursor = gallery.list_subjects("g", len(names), None)
    assert len(exact) == len(names) and cursor is None

    with pytest.raises(InvalidInput):
        gallery.list_subjects("g", 0, None)
    with pytest.raises(InvalidInput):
        gallery.list_subjects("g", 10, "%%%not-base64%%%")
    with pytest.raises(GalleryNotFound):
        gallery.list_subjects("nope", 10, None)


# --- faces and search ------------------------------------------------------------------


def test_add_face_refuses_bad_input_and_changes_nothing(gallery):
    rng = np.random.default_rng(3)
    gallery.upsert_subject("g", "s", None, MODEL)
    gallery.add_face("g", "s", unit(rng), MODEL, {})
    before = gallery.sync_status()["head_seq"], gallery.get_gallery("g")["faces"]

    bad = {
        "wrong dimension": unit(rng, dim=DIM + 1),
        "not normalised": unit(rng) * 1.5,
        "not finite": np.full(DIM, np.nan, np.float32),
        "integer": np.ones(DIM, np.int64),
        "batch": unit(rng, 2),
        "empty": np.zeros(0, np.float32),
    }
    for what, vector in bad.items():
        with pytest.raises(InvalidEmbedding) as exc:
            gallery.add_face("g", "s", vector, MODEL, {})
        assert exc.value.code == "invalid_embedding" and isinstance(exc.value, ValueError), what
    with pytest.raises(GalleryModelMismatch):
        gallery.add_face("g", "s", unit(rng), "model-b", {})
    with pytest.raises(SubjectNotFound):
        gallery.add_face("g", "nobody", unit(rng), MODEL, {})
    with pytest.raises(GalleryNotFound):
        gallery.add_face("nowhere", "s", unit(rng), MODEL, {})
    with pytest.raises(FaceNotFound) as exc:
        gallery.delete_face("g", 10**9)
    assert exc.value.code == "face_not_found" and exc.value.status == 404
    with pytest.raises(InvalidEmbedding):
        gallery.search("g", unit(rng, 1, DIM + 1), 1, MODEL)
    with pytest.raises(InvalidEmbedding):
        gallery.search("g", unit(rng, 1) * 2, 1, MODEL)
    with pytest.raises(GalleryModelMismatch):
        gallery.search("g", unit(rng, 1), 1, "model-b")

    assert (gallery.sync_status()["head_seq"], gallery.get_gallery("g")["faces"]) == before
    assert_index_matches_store(gallery)


def test_search_ranks_subjects_by_their_best_face(gallery):
    rng = np.random.default_rng(4)
    centres = {f"s{i}": unit(rng) for i in range(12)}
    faces: dict[str, list[tuple[int, np.ndarray]]] = {}
    for subject, centre in centres.items():
        gallery.upsert_subject("g", subject, None, MODEL)
        for _ in range(4 if subject == "s0" else 1):
            vector = near(rng, centre, 0.3)
            face = gallery.add_face("g", subject, vector, MODEL, {"det_score": 0.99})
            faces.setdefault(subject, []).append((face["face_id"], vector))
    # A probe right at one of s0's four faces: s0 must come first, once, with that face.
    target_id, target = faces["s0"][2]
    probe = near(rng, target, 0.01)
    results = gallery.search("g", np.stack([probe, centres["s5"]]), 5, MODEL)
    assert len(results) == 2
    hits = results[0]
    assert len(hits) == 5
    assert hits[0]["subject_id"] == "s0" and hits[0]["face_id"] == target_id
    assert len({h["subject_id"] for h in hits}) == 5  # de-duplicated by subject
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True)
    # Every similarity is the subject's best cosine (max fusion), computed here by hand.
    for hit in hits:
        best = max(float(v @ probe) for _, v in faces[hit["subject_id"]])
        assert hit["similarity"] == pytest.approx(best, abs=1e-5)
    assert results[1][0]["subject_id"] == "s5"
    # top_k larger than the gallery returns each subject once.
    everyone = gallery.search("g", probe[None], 50, MODEL)[0]
    assert sorted(h["subject_id"] for h in everyone) == sorted(centres)
    # Empty probe batch (an image without faces) yields no result lists.
    assert gallery.search("g", np.zeros((0, DIM), np.float32), 5, MODEL) == []


def test_subject_faces_are_read_from_the_store(gallery):
    rng = np.random.default_rng(11)
    gallery.upsert_subject("g", "a", None, MODEL)
    gallery.upsert_subject("g", "b", None, MODEL)
    vectors = unit(rng, 3)
    ids = [gallery.add_face("g", "a", v, MODEL, {})["face_id"] for v in vectors]
    gallery.add_face("g", "b", unit(rng), MODEL, {})
    gallery.delete_face("g", ids[1])

    faces = gallery.subject_faces("g", "a", MODEL)
    assert faces.face_ids.tolist() == [ids[0], ids[2]] and faces.subject_ids == ["a", "a"]
    assert faces.dim == DIM and faces.model_id == MODEL
    np.testing.assert_array_equal(faces.embeddings, vectors[[0, 2]])
    gallery.upsert_subject("g", "faceless", None, MODEL)
    assert gallery.subject_faces("g", "faceless", MODEL).embeddings.shape == (0, DIM)
    with pytest.raises(SubjectNotFound):
        gallery.subject_faces("g", "ghost", MODEL)
    with pytest.raises(GalleryNotFound):
        gallery.subject_faces("nowhere", "a", MODEL)
    with pytest.raises(GalleryModelMismatch):
        gallery.subject_faces("g", "a", "model-b")


def test_deletes_leave_search(gallery):
    rng = np.random.default_rng(5)
    a, b = unit(rng), unit(rng)
    for subject in ("a", "b"):
        gallery.upsert_subject("g", subject, None, MODEL)
    a_faces = [gallery.add_face("g", "a", near(rng, a), MODEL, {})["face_id"] for _ in range(3)]
    b_face = gallery.add_face("g", "b", near(rng, b), MODEL, {})["face_id"]
    assert gallery.search("g", a[None], 1, MODEL)[0][0]["subject_id"] == "a"

    gallery.delete_face("g", a_faces[0])
    assert a_faces[0] not in {h["face_id"] for h in gallery.search("g", a[None], 2, MODEL)[0]}
    assert [f["face_id"] for f in gallery.get_subject("g", "a")["faces"]] == a_faces[1:]

    assert gallery.delete_subject("g", "a") == 2
    hits = gallery.search("g", a[None], 5, MODEL)[0]
    assert [h["subject_id"] for h in hits] == ["b"] and hits[0]["face_id"] == b_face
    assert gallery.get_gallery("g")["faces"] == 1
    assert_index_matches_store(gallery)


@pytest.mark.parametrize("store_images", [False, True])
def test_images_are_stored_only_when_configured(services, store_images):
    gallery = services(store_images=store_images)
    rng = np.random.default_rng(6)
    gallery.upsert_subject("g", "s", None, MODEL)
    face = gallery.add_face("g", "s", unit(rng), MODEL, {}, image=b"\xff\xd8jpeg-bytes")
    stored = gallery.store.get_face_image("g", face["face_id"])
    assert stored == (b"\xff\xd8jpeg-bytes" if store_images else None)


# --- replicas, concurrency ----------------------------------------------------------------


def wait_until(predicate, timeout: float = 1.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


def test_two_replicas_see_each_others_writes_within_a_second(services):
    rng = np.random.default_rng(7)
    one, two = services("one"), services("two")
    one.upsert_subject("g", "alice", None, MODEL)
    alice = unit(rng)
    face = one.add_face("g", "alice", alice, MODEL, {})
    # Immediately visible on the writer's replica, within a second on the other.
    assert one.search("g", alice[None], 1, MODEL)[0][0]["face_id"] == face["face_id"]

    def two_sees_alice():
        hits = two.search("g", alice[None], 1, MODEL)[0]
        return bool(hits) and hits[0]["face_id"] == face["face_id"]

    wait_until(two_sees_alice)
    two.upsert_subject("g", "bob", None, MODEL)
    bob = unit(rng)
    bob_face = two.add_face("g", "bob", bob, MODEL, {})
    wait_until(lambda: one.search("g", bob[None], 1, MODEL)[0][0]["face_id"] == bob_face["face_id"])

    one.delete_subject("g", "bob")
    wait_until(
        lambda: [h["subject_id"] for h in two.search("g", bob[None], 5, MODEL)[0]] == ["alice"]
    )
    two.delete_face("g", face["face_id"])
    wait_until(lambda: one.search("g", alice[None], 5, MODEL)[0] == [])
    two.delete_gallery("g")
    wait_until(lambda: one.sync_status()["applied_seq"] == 5)
    with pytest.raises(GalleryNotFound):
        one.search("g", alice[None], 5, MODEL)
    status = one.sync_status()
    assert status["lag"] == 0 and status["applied_seq"] == status["head_seq"] == 5


@pytest.mark.timeout(180)
def test_sixteen_threads_mixing_writes_and_searches_keep_index_and_store_equal(services):
    one, two = services("one"), services("two")
    for subject in range(8):
        one.upsert_subject("g", f"s{subject}", None, MODEL)
    errors: list[BaseException] = []
    acked: list[int] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(100 + seed)
        replica = one if seed % 2 else two
        mine: list[int] = []
        try:
            for _ in range(30):
                action = rng.integers(0, 10)
                if action < 5 or not mine:
                    face = replica.add_face("g", f"s{rng.integers(0, 8)}", unit(rng), MODEL, {})
                    mine.append(face["face_id"])
                elif action < 7:
                    replica.delete_face("g", mine.pop(int(rng.integers(0, len(mine)))))
                else:
                    hits = replica.search("g", unit(rng, 3), 4, MODEL)
                    assert len(hits) == 3 and all(len(h) <= 4 for h in hits)
            with lock:
                acked.extend(mine)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    stored = one.store.face_ids("g")
    assert sorted(acked) == stored.tolist()  # no lost or phantom writes
    for replica in (one, two):
        replica.catch_up()
        assert np.array_equal(replica.index_face_ids("g"), stored)
        assert replica.sync_status()["lag"] == 0


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_check_index_compares_every_face_and_subject_with_the_store(services, index_type):
    rng = np.random.default_rng(12)
    one, two = services("one", index_type=index_type), services("two", index_type=index_type)
    _enrol(one, rng, 4, 3)
    one.delete_face("g", 5)  # hnsw: a tombstone, which the check must not count
    two.upsert_subject("empty", "nobody", None, MODEL)  # a gallery without faces
    two.catch_up()
    if index_type == "ivf":  # the trained index keeps its ids in inverted lists
        two.replica.indexes["g"].train()
    stored = one.store.face_ids("g").tolist()
    for replica in (one, two):
        report = replica.check_index()
        assert report["consistent"] and report["seq"] == report["applied_seq"] == 13, report
        by_name = {g["name"]: g for g in report["galleries"]}
        assert by_name["g"] == {
            "name": "g",
            "consistent": True,
            "store_faces": 11,
            "index_faces": 11,
            "missing": 0,
            "extra": 0,
            "wrong_subject": 0,
            "examples": {"missing": [], "extra": [], "wrong_subject": []},
        }
        assert by_name["empty"]["consistent"] and by_name["empty"]["store_faces"] == 0

    # Make two's index differ from the store in each way the check counts.
    index = two.replica.indexes["g"]
    index.remove([stored[0]])  # a stored face the index lost
    index.add([999_999], ["ghost"], unit(rng)[None])  # a face the store never had
    index._index.add_with_ids(unit(rng)[None], np.array([stored[2]]))  # a duplicate vector
    index._subject_of[stored[1]] = "someone-else"  # a face filed under the wrong subject
    report = two.check_index(examples=5)
    g = next(g for g in report["galleries"] if g["name"] == "g")
    assert not report["consistent"] and not g["consistent"]
    assert (g["store_faces"], g["index_faces"]) == (11, 12)
    assert (g["missing"], g["extra"], g["wrong_subject"]) == (1, 2, 1)
    owner = one.store.index_contents()[1]["g"][1][1]
    assert g["examples"] == {
        "missing": [stored[0]],
        "extra": sorted([stored[2], 999_999]),
        "wrong_subject": [{"face_id": stored[1], "store": owner, "index": "someone-else"}],
    }
    assert two.check_index(examples=1)["galleries"][1]["examples"]["extra"] == [stored[2]]
    # a gallery only the index holds is all extra (every vector); the other replica agrees
    two.replica.indexes["phantom"] = index
    phantom = next(g for g in two.check_index()["galleries"] if g["name"] == "phantom")
    assert phantom["store_faces"] == 0 and phantom["extra"] == phantom["index_faces"] == 12
    assert one.check_index()["consistent"]


def test_sync_settings_are_validated(monkeypatch):
    defaults = Settings()
    assert (defaults.sync_interval_s, defaults.sync_bound_s, defaults.sync_unready_after_s) == (
        0.25,
        1.0,
        5.0,
    )
    for bad in (
        {"sync_interval_s": 0},
        {"sync_interval_s": -1},
        {"sync_interval_s": 1.0},
        {"sync_bound_s": 0},
        {"sync_bound_s": 5.0},
        {"sync_unready_after_s": 0.5},
    ):
        with pytest.raises(ValidationError):
            Settings(**bad)
    monkeypatch.setenv("FACEGATE_SYNC_BOUND_S", "0.2")
    with pytest.raises(ValidationError, match="FACEGATE_SYNC_INTERVAL_S < FACEGATE_SYNC_BOUND_S"):
        Settings()
    monkeypatch.setenv("FACEGATE_SYNC_INTERVAL_S", "0.1")
    assert Settings().sync_bound_s == 0.2


# --- durability, migrations, snapshots ------------------------------------------------

CHILD = r"""
import sys, numpy as np
from service.config import Settings
from service.gallery import open_gallery
store_url, data_dir = sys.argv[1], sys.argv[2]
service = open_gallery(Settings(store_url=store_url, data_dir=data_dir, faiss_gpu=False))
service.start()
service.upsert_subject("g", "s", None, "model-a")
rng = np.random.default_rng(0)
while True:
    x = rng.standard_normal(32).astype(np.float32)
    face = service.add_face("g", "s", x / np.linalg.norm(x), "model-a", {})
    print("ack", face["face_id"], flush=True)
"""


@pytest.mark.timeout(120)
def test_acknowledged_faces_survive_kill_9(tmp_path, store_url):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, store_url, str(tmp_path / "child")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    acked = []
    try:
        for line in child.stdout:
            acked.append(int(line.split()[1]))
            if len(acked) == 60:
                break
        os.kill(child.pid, signal.SIGKILL)  # mid-burst: the next add is in flight
        # the child may have printed (acknowledged) more faces than read so far: the pipe
        # buffers them; they count as acknowledged too
        acked.extend(int(line.split()[1]) for line in child.stdout.read().splitlines())
    finally:
        child.kill()
        child.wait()
    assert len(acked) >= 60

    service = open_gallery(make_settings(tmp_path, store_url, "after"))
    service.start()
    try:
        stored = service.store.face_ids("g").tolist()
        assert len(stored) == len(set(stored))
        assert set(acked) <= set(stored)  # every acknowledged face, exactly once
        assert len(stored) - len(acked) <= 1  # at most the one in flight, committed unacked
        assert service.get_gallery("g")["faces"] == len(stored)
        assert service.index_face_ids("g").tolist() == stored
    finally:
        service.stop()


def test_migrations_are_versioned_and_idempotent(store_url):
    store = open_store(store_url)
    try:
        assert store.schema_version() == 0
        assert store.migrate() == LATEST
        assert store.migrate() == LATEST  # a second run changes nothing
        assert store.schema_version() == LATEST
        with store._ddl() as cur:  # a store written by newer code is refused
            cur.execute("UPDATE schema_version SET version = ?", (LATEST + 1,))
        with pytest.raises(RuntimeError, match="newer"):
            store.migrate()
    finally:
        store.close()


def _enrol(service: GalleryService, rng, subjects: int, faces: int, prefix: str = "s") -> None:
    for s in range(subjects):
        service.upsert_subject("g", f"{prefix}{s}", None, MODEL)
        for _ in range(faces):
            service.add_face("g", f"{prefix}{s}", unit(rng), MODEL, {})


def test_snapshot_is_loaded_verified_and_caught_up(services, tmp_path):
    rng = np.random.default_rng(8)
    first = services("a")
    _enrol(first, rng, 10, 3)
    first.delete_face("g", 2)
    first.stop()
    snapshot = first.snapshot_dir / "manifest.json"
    assert json.loads(snapshot.read_text())["seq"] == 31

    # Fresh snapshot: loaded, nothing to catch up.
    second = services("a")
    assert second.source == "snapshot" and second.sync_status()["applied_seq"] == 31
    assert_index_matches_store(second)
    # Another replica (snapshots off) writes more; the stale snapshot is caught up from the log.
    second.stop()
    other = services("other", gallery_snapshots=False)
    _enrol(other, rng, 3, 2, prefix="t")
    other.delete_subject("g", "s1")
    third = services("a")
    assert third.source == "snapshot"
    assert third.sync_status()["applied_seq"] == other.sync_status()["head_seq"]
    assert_index_matches_store(third)
    probe = unit(rng)
    assert third.search("g", probe[None], 5, MODEL) == other.search("g", probe[None], 5, MODEL)


def test_workers_sharing_a_data_dir_write_whole_snapshot_sets(services, tmp_path):
    """``serve --workers N`` stops N services on one data dir at once: their snapshot writes
    must not interleave (each set is written whole, one writer at a time)."""
    rng = np.random.default_rng(13)
    first = services("shared")
    for name in ("g1", "g2", "g3"):
        first.upsert_subject(name, "s", None, MODEL)
        for _ in range(20):
            first.add_face(name, "s", unit(rng, dim=256), MODEL, {})
    second = services("shared")
    assert second.snapshot_dir == first.snapshot_dir
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def write(service: GalleryService) -> None:
        try:
            for _ in range(30):
                barrier.wait()
                service.write_snapshots()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=write, args=(s,)) for s in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert not list(first.snapshot_dir.glob("*.tmp"))
    third = services("shared")
    assert third.source == "snapshot"
    assert_index_matches_store(third)


def test_snapshot_that_disagrees_with_the_store_is_rebuilt(services):
    rng = np.random.default_rng(9)
    first = services("a")
    _enrol(first, rng, 4, 2)
    first.stop()
    sidecars = sorted(first.snapshot_dir.glob("*.json"))
    sidecar = next(p for p in sidecars if p.name != "manifest.json")

    # 1. a damaged index file fails its checksum
    index_file = sidecar.with_suffix(".faiss")
    data = bytearray(index_file.read_bytes())
    data[-1] ^= 0xFF
    index_file.write_bytes(bytes(data))
    second = services("a")
    assert second.source == "store"
    assert_index_matches_store(second)
    second.stop()

    # 2. a consistent snapshot that claims a seq the log has not reached
    manifest = second.snapshot_dir / "manifest.json"
    spec = json.loads(manifest.read_text())
    spec["seq"] += 100
    manifest.write_text(json.dumps(spec))
    third = services("a")
    assert third.source == "store"
    third.stop()

    # 3. a snapshot whose faces differ from the store (verified by ids, not just counts)
    meta = json.loads(sidecar.read_text())
    meta["face_ids"][0] = 999_999
    sidecar.write_text(json.dumps(meta))
    fourth = services("a")
    assert fourth.source == "store"
    assert_index_matches_store(fourth)


def test_snapshot_of_another_model_or_dimension_is_rebuilt(services):
    rng = np.random.default_rng(12)
    first = services("a")
    _enrol(first, rng, 3, 2)
    probe = unit(rng)
    first.stop()

    # 1. the store's gallery now belongs to another model (same faces, same seq: a store
    #    restored from elsewhere); the snapshot's model-a index must not be served
    store = open_store(first.store_url)
    try:
        with store._ddl() as cur:
            cur.execute("UPDATE galleries SET model_id = ? WHERE name = ?", ("model-b", "g"))
            cur.execute("UPDATE faces SET model_id = ? WHERE gallery = ?", ("model-b", "g"))
    finally:
        store.close()
    second = services("a")
    assert second.source == "store"
    assert len(second.search("g", probe[None], 3, "model-b")[0]) == 3
    with pytest.raises(GalleryModelMismatch):
        second.search("g", probe[None], 3, MODEL)
    second.stop()

    # 2. a snapshot (now of model-b) whose index claims another dimension than the store's
    sidecar = next(p for p in second.snapshot_dir.glob("*.json") if p.name != "manifest.json")
    meta = json.loads(sidecar.read_text())
    assert meta["model_id"] == "model-b"
    meta["dim"] = DIM * 2
    sidecar.write_text(json.dumps(meta))
    third = services("a")
    assert third.source == "store"
    assert len(third.search("g", probe[None], 3, "model-b")[0]) == 3


def test_follower_rebuilds_on_a_gap_in_the_log(services):
    rng = np.random.default_rng(10)
    one, two = services("one"), services("two")
    _enrol(one, rng, 2, 2)
    wait_until(lambda: two.sync_status()["lag"] == 0)
    with two.store._ddl() as cur:  # simulate a lost entry: seq 6 vanishes
        cur.execute("UPDATE log_head SET seq = seq + 1")
    one.upsert_subject("g", "late", None, MODEL)
    face = one.add_face("g", "late", unit(rng), MODEL, {})
    wait_until(lambda: two.index_face_ids("g").tolist() == one.store.face_ids("g").tolist())
    assert face["face_id"] in two.index_face_ids("g").tolist()


def test_postgres_notify_wakes_other_replicas_before_the_poll(tmp_path, postgres_url):
    """With a 30 s poll, only LISTEN/NOTIFY can make a remote write visible within a second."""
    rng = np.random.default_rng(11)
    services = []
    try:
        for name in ("one", "two"):
            service = open_gallery(
                make_settings(
                    tmp_path,
                    postgres_url,
                    name,
                    sync_interval_s=30.0,
                    sync_bound_s=31.0,
                    sync_unready_after_s=60.0,
                )
            )
            assert not service.ready()
            service.start()
            services.append(service)
        one, two = services
        assert one.ready() and two.ready()
        time.sleep(0.2)  # let the follower threads reach LISTEN
        one.upsert_subject("g", "alice", None, MODEL)
        alice = unit(rng)
        face = one.add_face("g", "alice", alice, MODEL, {})
        wait_until(
            lambda: (
                two.search("g", alice[None], 1, MODEL)[0][:1]
                and two.search("g", alice[None], 1, MODEL)[0][0]["face_id"] == face["face_id"]
            )
        )
        one.delete_face("g", face["face_id"])
        wait_until(lambda: two.search("g", alice[None], 1, MODEL)[0] == [])
        status = two.sync_status()
        assert {k: status[k] for k in ("ready", "applied_seq", "head_seq", "lag")} == {
            "ready": True,
            "applied_seq": 2,
            "head_seq": 2,
            "lag": 0,
        }
        assert 0 <= status["last_synced_age_s"] < 5 and "reason" not in status
    finally:
        for service in services:
            service.stop()


def test_hostile_names_metadata_and_cursors_are_refused_before_writing(gallery):
    """The gallery layer itself (under the REST API and the CLI) refuses dot-segment ids,
    metadata it could not read back, and cursors of another gallery; nothing is written."""
    gallery.upsert_subject("g", "alice", {"team": "red"}, MODEL)
    gallery.upsert_subject("other", "zed", None, MODEL)
    for bad in (".", ".."):
        with pytest.raises(InvalidInput, match="dot-segment"):
            gallery.upsert_subject("g", bad, None, MODEL)
        with pytest.raises(InvalidInput, match="dot-segment"):
            gallery.create_gallery(bad, MODEL)
        with pytest.raises(InvalidInput, match="dot-segment"):
            gallery.delete_gallery(bad)
    deep: dict = {}
    node = deep
    for _ in range(255):  # 256 levels, as in issue 17
        node["a"] = {}
        node = node["a"]
    for metadata in (deep, {"name": "\ud800"}):
        with pytest.raises(InvalidInput) as exc:
            gallery.upsert_subject("g", "bob", metadata, MODEL)
        assert exc.value.code == "invalid_metadata" and exc.value.status == 400
        with pytest.raises(InvalidInput):
            gallery.update_subject("g", "alice", {"x": metadata})
    assert gallery.get_gallery("g")["subjects"] == 1
    assert gallery.get_subject("g", "alice")["metadata"] == {"team": "red"}

    gallery.upsert_subject("g", "bob", None, MODEL)
    page, cursor = gallery.list_subjects("g", 1, None)
    assert [s["subject_id"] for s in page] == ["alice"] and cursor
    for bad in (cursor + "x", "!!!", "YWxpY2U", cursor[:-2]):  # "YWxpY2U": base64 of "alice"
        with pytest.raises(InvalidInput) as exc:
            gallery.list_subjects("g", 1, bad)
        assert exc.value.code == "invalid_cursor"
    with pytest.raises(InvalidInput):  # g's cursor on gallery "other"
        gallery.list_subjects("other", 1, cursor)
