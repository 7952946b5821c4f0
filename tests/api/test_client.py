"""``service.client`` (sync and async) against a real server on 127.0.0.1 with real LFW
photos and the reference models: every call the client offers, and server errors raised as
typed exceptions carrying the server's code."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest

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
    )
    running = InProcessServer(settings).start()
    yield running
    running.stop()


def test_sync_client(server):
    with Client(server.base_url, KEY) as fg:
        assert fg.create_gallery("staff")["name"] == "staff"
        fg.create_subject("staff", PEOPLE[0], {"team": "x"})
        face = fg.enrol("staff", PEOPLE[0], photo_path(PEOPLE[0], 1))  # a path
        assert face["face_id"] >= 1
        bulk = fg.enrol_many(
            "staff", [(name, photo_path(name, 1).read_bytes(), {"n": 1}) for name in PEOPLE[1:]]
        )
        assert bulk["enrolled"] == 2
        assert [g["name"] for g in fg.galleries()] == ["staff"]
        assert fg.gallery("staff")["faces"] == 3
        page = fg.subjects("staff", limit=2)
        assert len(page["subjects"]) == 2 and page["next_cursor"]
        assert fg.subject("staff", PEOPLE[1])["metadata"] == {"n": 1}
        assert fg.update_subject("staff", PEOPLE[1], {"m": 2})["metadata"] == {"n": 1, "m": 2}

        answer = fg.identify("staff", photo_path(PEOPLE[1], 2), top_k=2)
        assert answer["faces"][0]["match"] == PEOPLE[1]
        assert (
            fg.verify(photo_path(PEOPLE[2], 2), gallery="staff", subject_id=PEOPLE[2])["match"]
            is True
        )
        assert fg.verify(photo_path(PEOPLE[0], 1), photo_path(PEOPLE[1], 1))["match"] is False
        embedded = fg.embed(
            photo_path(PEOPLE[1], 2), embedding_format="base64", multiple_faces="largest"
        )
        by_vector = fg.identify(
            "staff", embedding=embedded["faces"][0]["embedding"], model=embedded["model"], top_k=2
        )
        assert by_vector["faces"][0]["candidates"] == answer["faces"][0]["candidates"]
        assert len(fg.detect(photo_path(PEOPLE[0], 1))["faces"]) >= 1
        assert fg.info()["models"]

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
        assert fg.delete_face("staff", face["face_id"])["deleted"] is True
        assert fg.delete_subject("staff", PEOPLE[0])["faces_removed"] == 0
        assert fg.delete_gallery("staff") == {"deleted": "staff"}
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
            assert (await fg.gallery("async"))["faces"] == 1
            with pytest.raises(NotFound) as exc:
                await fg.gallery("nowhere")
            assert exc.value.code == "gallery_not_found"
            await fg.delete_gallery("async")

    asyncio.run(scenario())
