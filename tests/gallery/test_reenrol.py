"""``service.reenrol`` on the gallery service over both store backends, with real models.

Gallery "old" holds embeddings of recognizer A (``facegate_mfn_cosface``) with their
LFW photos; ``Reenrolment`` with recognizer B (``mobilefacenet_peer_128d``) builds
"new" from the stored photos while a second replica follows the store's change log.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.config import Settings
from service.gallery import (
    Conflict,
    GalleryModelMismatch,
    GalleryNotFound,
    NoStoredImages,
    open_gallery,
)
from service.gallery import sql as gallery_sql
from service.gallery.backends import open_store
from service.gallery.schema import LATEST, MIGRATIONS
from service.pipeline.pipeline import Pipeline
from service.reenrol import Reenrolment
from tests.conftest import SHARED_MODELS, photo

PEOPLE = ["Abdoulaye_Wade", "Angela_Merkel", "Arianna_Huffington"]  # one face per photo


def model_settings(recognizer: str, **overrides) -> Settings:
    return Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer=recognizer,
        providers=["CPUExecutionProvider"],
        faiss_gpu=False,
        **overrides,
    )


@pytest.fixture(scope="module")
def pipelines():
    return {
        name: Pipeline.from_settings(model_settings(name))
        for name in ("facegate_mfn_cosface", "mobilefacenet_peer_128d")
    }


@pytest.fixture
def services(tmp_path, store_url):
    started = []

    def start(name: str, **overrides):
        settings = model_settings(
            "mobilefacenet_peer_128d",
            data_dir=tmp_path / name,
            store_url=store_url,
            sync_interval_s=0.05,
            **overrides,
        )
        service = open_gallery(settings)
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def embed_one(pipeline: Pipeline, data: bytes) -> np.ndarray:
    image = pipeline.decode(data)
    faces = pipeline.detect(image)
    return pipeline.embed(pipeline.align(image, faces[:1]))[0]


def test_reenrol_on_both_backends(services, pipelines, tmp_path):
    old_pipe, new_pipe = pipelines["facegate_mfn_cosface"], pipelines["mobilefacenet_peer_128d"]
    model_a, model_b = old_pipe.embedder.model_id, new_pipe.embedder.model_id
    one = services("one", store_images=True)
    two = services("two")  # a replica that only follows the log
    faces = {}
    for name in PEOPLE:
        one.upsert_subject("old", name, {"who": name}, model_a)
        for number in (1, 2):
            data = photo(name, number)
            face = one.add_face("old", name, embed_one(old_pipe, data), model_a, {}, image=data)
            faces[face["face_id"]] = name
    one.upsert_subject("old", "nobody", None, model_a)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(old_pipe.embedder.dim).astype(np.float32)
    noise /= np.linalg.norm(noise)
    no_image = one.add_face("old", "nobody", noise, model_a, {})  # image=None: not stored
    garbage = one.add_face("old", "nobody", noise, model_a, {}, image=b"not an image")

    with pytest.raises(GalleryModelMismatch):
        one.search("old", noise[None, :], 1, model_b)
    settings = one.settings
    report = Reenrolment(one, new_pipe, settings, "old", "new", chunk=4).run()
    assert report["subjects_copied"] == len(PEOPLE) + 1
    assert report["faces_reenrolled"] == len(faces)
    assert report["faces_without_image"] == 1 and report["faces_already_reenrolled"] == 0
    assert report["skipped"] == [
        {
            "face_id": garbage["face_id"],
            "subject_id": "nobody",
            "code": "unsupported_image_type",
            "message": report["skipped"][0]["message"],
        }
    ]
    assert no_image["face_id"] not in one.store.reenrolled_sources("new")
    assert one.store.reenrolled_sources("new") == set(faces)
    assert one.get_gallery("new")["model_id"] == model_b
    assert one.get_subject("new", PEOPLE[0])["metadata"] == {"who": PEOPLE[0]}

    # the follower replica applies the re-enrolled faces from the change log
    two.catch_up()
    stored = one.store.face_ids("new")
    assert len(stored) == len(faces)
    assert np.array_equal(two.index_face_ids("new"), stored)
    for name in PEOPLE:
        candidates = two.search("new", embed_one(new_pipe, photo(name, 3))[None, :], 1, model_b)[0]
        assert candidates[0]["subject_id"] == name

    again = Reenrolment(one, new_pipe, settings, "old", "new", chunk=4).run()
    assert again["faces_reenrolled"] == 0 and again["subjects_copied"] == 0
    assert again["faces_already_reenrolled"] == len(faces)
    assert len(one.store.face_ids("new")) == len(faces)

    # the store refuses a second face from the same source face, under its writer lock
    first = min(faces)
    vector = embed_one(new_pipe, photo(faces[first], 1))
    with pytest.raises(Conflict):
        one.add_face("new", faces[first], vector, model_b, {}, source_face_id=first)

    # refusals, before anything is written
    with pytest.raises(Conflict):
        Reenrolment(one, new_pipe, settings, "new", "new").prepare()
    with pytest.raises(GalleryNotFound):
        Reenrolment(one, new_pipe, settings, "nowhere", "new3").prepare()
    with pytest.raises(GalleryModelMismatch):
        Reenrolment(one, new_pipe, settings, "new", "old").prepare()
    one.upsert_subject("plain", "s", None, model_a)
    one.add_face("plain", "s", noise, model_a, {})  # plain's photo was never stored
    bare = services("bare")  # store_images false: nothing of "plain2" is kept
    bare.upsert_subject("plain2", "s", None, model_a)
    bare.add_face("plain2", "s", noise, model_a, {}, image=photo(PEOPLE[0], 1))
    for source in ("plain", "plain2"):
        with pytest.raises(NoStoredImages) as exc:
            Reenrolment(one, new_pipe, settings, source, "new4").prepare()
        assert exc.value.code == "no_stored_images" and exc.value.status == 409
    assert "new3" not in {g["name"] for g in one.list_galleries()}
    assert "new4" not in {g["name"] for g in one.list_galleries()}


def test_version_1_store_migrates_to_source_face_ids(store_url, monkeypatch):
    store = open_store(store_url)
    try:
        monkeypatch.setattr(gallery_sql, "LATEST", 1)
        assert store.migrate() == 1
        vector = np.zeros(4, "<f4")
        vector[0] = 1.0
        with store._write() as cur:  # a face written by the version-1 code
            cur.execute(
                "INSERT INTO galleries (name, model_id, dim, created_at) VALUES ('g', 'm', 4, 0)"
            )
            cur.execute(
                "INSERT INTO subjects (gallery, subject_id, metadata, created_at, "
                "updated_at) VALUES ('g', 's', '{}', 0, 0)"
            )
            cur.execute(
                "INSERT INTO faces (gallery, subject_id, embedding, model_id, quality, "
                "created_at) VALUES ('g', 's', ?, 'm', '{}', 0)",
                (vector.tobytes(),),
            )
        monkeypatch.setattr(gallery_sql, "LATEST", LATEST)
        assert LATEST >= 2 and len(MIGRATIONS[store.dialect]) == LATEST
        assert store.migrate() == LATEST
        [face] = store.get_subject("g", "s")["faces"]
        assert "reenrolled_from" not in face
        assert store.reenrolled_sources("g") == set()
        assert store.image_counts("g") == (1, 0)
        added, _ = store.add_face("g", "s", vector, "m", {}, None, source_face_id=face["face_id"])
        assert added["reenrolled_from"] == face["face_id"]
        assert store.reenrolled_sources("g") == {face["face_id"]}
    finally:
        store.close()
