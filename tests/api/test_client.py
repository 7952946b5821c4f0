"""``service.client`` (sync and async) against a real server on 127.0.0.1 with real LFW
photos and the reference models: every call the client offers, and server errors raised as
typed exceptions carrying the server's code."""

from __future__ import annotations

import asyncio
import gzip
import json

import numpy as np
import pytest

from service.answers import (
    BulkAnswer,
    Candidate,
    Deleted,
    DetectAnswer,
    EmbedAnswer,
    EnrolAnswer,
    Face,
    IdentifyAnswer,
    InfoAnswer,
    ReenrolReport,
    VerifyAnswer,
)
from service.client import (
    AsyncClient,
    Client,
    Conflict,
    FacegateError,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthorized,
)
from service.config import Settings
from tests.conftest import LFW, SHARED_MODELS
from tests.support.service import InProcessServer

PEOPLE = ["Abdoulaye_Wade", "Angela_Merkel", "Arianna_Huffington"]
KEY = "client-test-key-0123456789"
LFW_SIDE = 250  # every LFW image is 250x250, centred on its face (data/lfw, README)
DIM = 128  # the recognizer's embedding dimension (its model card: mobilefacenet_peer_128d)


def photo_path(name: str, number: int):
    return sorted((LFW / "images" / name).glob("*.jpg"))[number - 1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer="mobilefacenet_peer_128d",
        providers=["CPUExecutionProvider"],
        faiss_gpu=False,
        data_dir=tmp_path_factory.mktemp("data"),
        api_keys=[KEY],
        store_images=True,  # so that reenrol has photos to enrol again
    )
    running = InProcessServer(settings).start()
    yield running
    running.stop()


def _centred(face: Face) -> bool:
    """An LFW face: a box around the image's centre, with the five landmarks inside it,
    the eyes above the nose above the mouth."""
    assert face.box is not None and face.landmarks is not None and len(face.landmarks) == 5
    x1, y1, x2, y2 = face.box
    (lx, ly), (rx, ry), (_nx, ny), (_mlx, mly), (_mrx, mry) = face.landmarks
    return (
        isinstance(face.score, float)
        and x1 < LFW_SIDE / 2 < x2
        and y1 < LFW_SIDE / 2 < y2
        and all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face.landmarks)
        and lx < rx
        and max(ly, ry) < ny < min(mly, mry)
    )


def test_sync_client(server):
    with Client(server.base_url, KEY) as fg:
        assert fg.create_gallery("staff")["name"] == "staff"
        fg.create_subject("staff", PEOPLE[0], {"team": "x"})
        face = fg.enrol("staff", PEOPLE[0], photo_path(PEOPLE[0], 1))  # a path
        assert face["face_id"] >= 1
        assert isinstance(face, EnrolAnswer) and face.face_id == face["face_id"]
        assert (face.gallery, face.subject_id) == ("staff", PEOPLE[0])
        assert isinstance(face.face, Face) and _centred(face.face)
        bulk = fg.enrol_many(
            "staff", [(name, photo_path(name, 1).read_bytes(), {"n": 1}) for name in PEOPLE[1:]]
        )
        assert bulk["enrolled"] == 2
        assert isinstance(bulk, BulkAnswer) and (bulk.enrolled, bulk.refused) == (2, 0)
        assert [(i.index, i.subject_id, i.created) for i in bulk.enrolled_items] == [
            (0, PEOPLE[1], True),
            (1, PEOPLE[2], True),
        ]
        assert all(isinstance(i.face_id, int) for i in bulk.results) and bulk.errors == ()
        refused = fg.enrol_many("staff", [(PEOPLE[1], photo_path(PEOPLE[1], 1)), ("x", b"junk")])
        assert (refused.enrolled, refused.already_enrolled, refused.refused) == (0, 1, 1)
        assert refused.results[0].created is False and refused.results[0].face_id is not None
        assert [i.index for i in refused.errors] == [1] and refused.errors[0].error is not None
        assert refused.errors[0].error.code == refused["items"][1]["error"]["code"]
        assert [g["name"] for g in fg.galleries()] == ["staff"]
        assert fg.gallery("staff")["faces"] == 3
        page = fg.subjects("staff", limit=2)
        assert len(page["subjects"]) == 2 and page["next_cursor"]
        assert fg.subject("staff", PEOPLE[1])["metadata"] == {"n": 1}
        assert fg.update_subject("staff", PEOPLE[1], {"m": 2})["metadata"] == {"n": 1, "m": 2}

        answer = fg.identify("staff", photo_path(PEOPLE[1], 2), top_k=2)
        assert answer["faces"][0]["match"] == PEOPLE[1]
        assert isinstance(answer, IdentifyAnswer) and answer.gallery == "staff"
        probe = answer.faces[0]
        assert probe.match == PEOPLE[1] and _centred(probe.face)
        assert len(probe.candidates) == 2 and all(
            isinstance(c, Candidate) for c in probe.candidates
        )
        best = probe.candidates[0]
        assert best.subject_id == PEOPLE[1] and isinstance(best.similarity, float)
        assert best.similarity >= answer.threshold > probe.candidates[1].similarity
        same = fg.verify(photo_path(PEOPLE[2], 2), gallery="staff", subject_id=PEOPLE[2])
        assert same["match"] is True
        assert isinstance(same, VerifyAnswer) and same.match is True
        assert same.similarity >= same.threshold and same.subject is not None
        assert (same.subject.gallery, same.subject.subject_id) == ("staff", PEOPLE[2])
        assert same.face1 is not None and _centred(same.face1) and same.face2 is None
        other = fg.verify(photo_path(PEOPLE[0], 1), photo_path(PEOPLE[1], 1))
        assert other["match"] is False
        assert other.match is False and other.similarity < other.threshold
        assert other.face2 is not None and _centred(other.face2) and other.subject is None
        assert other.model == same.model == answer.model
        embedded = fg.embed(
            photo_path(PEOPLE[1], 2), embedding_format="base64", multiple_faces="largest"
        )
        assert isinstance(embedded, EmbedAnswer) and embedded.embedding_dim == DIM
        assert (embedded.width, embedded.height) == (LFW_SIDE, LFW_SIDE)
        vector = embedded.faces[0].embedding
        assert isinstance(vector, np.ndarray) and vector.dtype == np.float32
        assert vector.shape == (DIM,) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3
        as_numbers = fg.embed(photo_path(PEOPLE[1], 2), multiple_faces="largest")
        assert as_numbers.embedding_format == "float"
        np.testing.assert_allclose(as_numbers.faces[0].embedding, vector, atol=1e-6)
        by_vector = fg.identify(
            "staff", embedding=embedded["faces"][0]["embedding"], model=embedded["model"], top_k=2
        )
        assert by_vector["faces"][0]["candidates"] == answer["faces"][0]["candidates"]
        vector_probe = by_vector.faces[0]  # an embedding probe: no box, no landmarks
        assert (vector_probe.face.box, vector_probe.face.landmarks) == (None, None)
        assert [c.subject_id for c in vector_probe.candidates] == [
            c.subject_id for c in probe.candidates
        ]
        detected = fg.detect(photo_path(PEOPLE[0], 1))
        assert len(detected["faces"]) >= 1
        assert isinstance(detected, DetectAnswer)
        assert (detected.width, detected.height) == (LFW_SIDE, LFW_SIDE)
        largest = detected.faces[0]
        assert _centred(largest) and largest.quality is not None
        assert largest.quality["det_score"] == pytest.approx(largest.score)
        info = fg.info()
        assert info["models"]
        assert isinstance(info, InfoAnswer) and info.recognizer == answer.model
        assert info.embedding_dim == DIM and (info.subjects, info.faces) == (3, 3)
        report = fg.reenrol("staff2", "staff")  # the same models: every photo again
        assert isinstance(report, ReenrolReport) and (report.source, report.target) == (
            "staff",
            "staff2",
        )
        assert (report.subjects_copied, report.faces_reenrolled, report.skipped) == (3, 3, ())
        assert fg.delete_gallery("staff2").gallery == "staff2"

        exported = fg.export("staff")
        lines = gzip.decompress(exported).splitlines()
        assert json.loads(lines[0])["gallery"] == "staff" and len(lines) == 1 + 3 + 3 + 1

        with pytest.raises(NotFound) as exc:
            fg.subject("staff", "nobody")
        assert exc.value.code == "subject_not_found" and exc.value.status == 404
        with pytest.raises(InvalidRequest) as exc:
            fg.enrol("staff", PEOPLE[0], b"not an image")
        assert exc.value.code == "unsupported_image_type"
        with pytest.raises(Conflict) as exc:
            fg.identify("staff", embedding=embedded["faces"][0]["embedding"], model="x@1")
        assert exc.value.code == "model_mismatch"
        gone = fg.delete_face("staff", face["face_id"])
        assert gone["deleted"] is True
        assert isinstance(gone, Deleted) and (gone.gallery, gone.face_id) == ("staff", face.face_id)
        subject_gone = fg.delete_subject("staff", PEOPLE[0])
        assert subject_gone["faces_removed"] == 0
        assert (subject_gone.subject_id, subject_gone.faces_removed) == (PEOPLE[0], 0)
        assert fg.delete_gallery("staff") == {"deleted": "staff"}
        assert bulk == bulk.to_dict() and {**bulk}["items"] == bulk["items"]  # reads as JSON
    with Client(server.base_url) as anonymous, pytest.raises(Unauthorized):
        anonymous.galleries()
    with Client(server.base_url, "wrong") as wrong, pytest.raises(Forbidden) as exc:
        wrong.galleries()
    assert isinstance(exc.value, FacegateError) and exc.value.code == "forbidden"


def test_async_client(server):
    async def scenario() -> None:
        async with AsyncClient(server.base_url, KEY) as fg:
            await fg.create_subject("async", PEOPLE[0])
            await fg.enrol("async", PEOPLE[0], photo_path(PEOPLE[0], 1).read_bytes())
            results = await asyncio.gather(
                *(fg.identify("async", photo_path(PEOPLE[0], n)) for n in (2, 3))
            )
            assert [r["faces"][0]["match"] for r in results] == [PEOPLE[0]] * 2
            assert [r.faces[0].match for r in results] == [PEOPLE[0]] * 2
            assert all(isinstance(r, IdentifyAnswer) for r in results)
            assert (await fg.gallery("async"))["faces"] == 1
            with pytest.raises(NotFound) as exc:
                await fg.gallery("nowhere")
            assert exc.value.code == "gallery_not_found"
            await fg.delete_gallery("async")

    asyncio.run(scenario())
