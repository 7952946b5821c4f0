"""``POST /v1/verify`` against an enrolled subject, with exact and approximate indexes.

A real uvicorn server (in-process, 127.0.0.1), the reference models from ../shared
and real LFW photos enrolled and probed over HTTP.  Verification compares the probe
with every enrolled face of the subject (max fusion), so an approximate index (IVF,
whose search skips unprobed lists) must not change its answer.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from service.config import Settings
from service.gallery import index as index_module
from tests.conftest import LFW, SHARED_MODELS
from tests.support.service import InProcessServer

#: subject -> (LFW name, numbers of the photos enrolled, numbers of the probe photos)
PEOPLE = {
    "powell": ("Colin_Powell", (40, 71, 95), (133, 170)),
    "blair": ("Tony_Blair", (18, 48, 53), (64, 86)),
    "schroeder": ("Gerhard_Schroeder", (5, 17, 25), (27, 32)),
}
IVF_FACES = 2000  # gallery size at which the IVF gallery trains (patched IVF_MIN_TRAIN)


def _photo(person: str, number: int) -> bytes:
    name = PEOPLE[person][0]
    return (LFW / "images" / name / f"{name}_{number:04d}.jpg").read_bytes()


def _probes(person: str) -> tuple[int, ...]:
    return PEOPLE[person][2]


def _start(tmp_path_factory, index_type: str) -> InProcessServer:
    settings = Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer="mobilefacenet_peer_128d",
        providers=["CPUExecutionProvider"],
        data_dir=tmp_path_factory.mktemp(f"verify-{index_type}"),
        index_type=index_type,
        faiss_gpu=False,
    )
    return InProcessServer(settings).start()


def _embed(client: httpx.Client, image: bytes) -> np.ndarray:
    r = client.post("/v1/embed", files={"image": ("face.jpg", image)})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["faces"][0]["embedding"], dtype=np.float32)


def _enrol(client: httpx.Client, gallery: str, person: str) -> dict[int, np.ndarray]:
    """Enrol ``person``'s enrolment photos; face_id -> its embedding (from /v1/embed)."""
    r = client.post(f"/v1/galleries/{gallery}/subjects", json={"subject_id": person})
    assert r.status_code == 201, r.text
    faces = {}
    for number in PEOPLE[person][1]:
        image = _photo(person, number)
        r = client.post(
            f"/v1/galleries/{gallery}/subjects/{person}/faces", files={"image": ("face.jpg", image)}
        )
        assert r.status_code == 201, r.text
        faces[r.json()["face_id"]] = _embed(client, image)
    return faces


def _verify(client: httpx.Client, gallery: str, subject_id: str, image: bytes) -> httpx.Response:
    return client.post(
        "/v1/verify",
        files={"image1": ("probe.jpg", image)},
        data={"gallery": gallery, "subject_id": subject_id},
    )


def _best(faces: dict[int, np.ndarray], probe: np.ndarray) -> tuple[float, int]:
    """Max fusion by hand: the best face's (similarity, face_id)."""
    face_id = max(faces, key=lambda f: float(faces[f] @ probe))
    return float(faces[face_id] @ probe), face_id


@pytest.mark.timeout(300)
def test_verify_with_a_flat_index_equals_the_subjects_search_candidate(tmp_path_factory):
    server = _start(tmp_path_factory, "flat")
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            enrolled = {person: _enrol(client, "people", person) for person in PEOPLE}
            gallery, model_id = server.state.gallery, server.state.model_id
            for person in PEOPLE:
                for number in _probes(person):
                    image = _photo(person, number)
                    probe = _embed(client, image)
                    # The ranking of every subject by its best face (exact with a flat index)
                    ranked = {
                        c["subject_id"]: c
                        for c in gallery.search("people", probe[None], len(PEOPLE), model_id)[0]
                    }
                    for subject in PEOPLE:
                        r = _verify(client, "people", subject, image)
                        assert r.status_code == 200, r.text
                        body = r.json()
                        assert body["subject"] == {
                            "gallery": "people",
                            "subject_id": subject,
                            "face_id": ranked[subject]["face_id"],
                        }
                        assert body["similarity"] == pytest.approx(
                            ranked[subject]["similarity"], abs=1e-5
                        )
                        similarity, face_id = _best(enrolled[subject], probe)
                        assert body["similarity"] == pytest.approx(similarity, abs=1e-4)
                        assert body["subject"]["face_id"] == face_id
                        assert body["match"] == (body["similarity"] >= body["threshold"])
    finally:
        server.stop()


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.timeout(300)
def test_verify_finds_a_subject_an_ivf_search_misses(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(index_module, "IVF_MIN_TRAIN", IVF_FACES)
        server = _start(tmp_path_factory, "ivf")
        try:
            _check_ivf(server)
        finally:
            server.stop()


def _check_ivf(server: InProcessServer) -> None:
    gallery, model_id = server.state.gallery, server.state.model_id
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        faces = _enrol(client, "crowd", "powell")
        image = _photo("powell", _probes("powell")[0])
        probe = _embed(client, image)

        # Synthetic distractors: most of them close to the probe, the rest close to the
        # subject's own faces, so that IVF's lists nearest the probe hold distractors
        # and the subject's faces sit in lists the search does not probe.
        rng = np.random.default_rng(0)
        own = np.stack(list(faces.values()))
        count = IVF_FACES - len(faces)
        near_probe = count * 3 // 4
        centres = np.concatenate(
            [
                np.repeat(probe[None], near_probe, axis=0),
                own[np.arange(count - near_probe) % len(own)],
            ]
        )
        vectors = _unit(centres + 0.05 * rng.standard_normal(centres.shape).astype(np.float32))
        for i, vector in enumerate(vectors):
            subject = f"d{i // 4:04d}"
            if i % 4 == 0:
                gallery.upsert_subject("crowd", subject, None, model_id)
            gallery.add_face("crowd", subject, vector, model_id, {})
        subjects = gallery.get_gallery("crowd")["subjects"]
        assert gallery.get_gallery("crowd")["faces"] == IVF_FACES

        # What verify used to do, ask the index for every subject, does not find this one.
        ranked = gallery.search("crowd", probe[None], subjects, model_id)[0]
        assert "powell" not in {c["subject_id"] for c in ranked}, (
            "the IVF search probed the subject's lists; the test no longer shows the miss"
        )
        assert len(ranked) < subjects

        r = _verify(client, "crowd", "powell", image)
        assert r.status_code == 200, r.text
        body = r.json()
        similarity, face_id = _best(faces, probe)
        assert body["similarity"] == pytest.approx(similarity, abs=1e-4)
        assert body["subject"] == {"gallery": "crowd", "subject_id": "powell", "face_id": face_id}
        assert body["match"] == (body["similarity"] >= body["threshold"])

        # A distractor subject is scored by its own faces too; a missing one is still 404.
        r = _verify(client, "crowd", "d0000", image)
        assert r.status_code == 200 and r.json()["subject"]["subject_id"] == "d0000", r.text
        r = _verify(client, "crowd", "ghost", image)
        assert r.status_code == 404 and r.json()["error"]["code"] == "subject_not_found"
