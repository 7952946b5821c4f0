"""``embedding`` probes on ``/v1/identify`` and ``/v1/verify`` against a real server, both
store backends: a client that embeds elsewhere (here with ``/v1/embed``) gets the same
candidates and scores as with the photo; another model's, malformed or unnormalised
vectors are refused with their codes."""

from __future__ import annotations

import base64

import httpx
import numpy as np

from service.config import Settings
from tests.conftest import SHARED_MODELS, photo
from tests.support.service import InProcessServer

PEOPLE = ["Abdoulaye_Wade", "Angela_Merkel", "Arianna_Huffington"]


def test_probe_embedding(tmp_path, store_url):
    settings = Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer="mobilefacenet_peer_128d",
        providers=["CPUExecutionProvider"],
        faiss_gpu=False,
        data_dir=tmp_path / "data",
        store_url=store_url,
    )
    server = InProcessServer(settings).start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            items = [
                {"subject_id": name, "image": base64.b64encode(photo(name, 1)).decode()}
                for name in PEOPLE
            ]
            assert client.post("/v1/galleries/g/faces", json={"items": items}).json()[
                "enrolled"
            ] == len(PEOPLE)
            probe = photo(PEOPLE[1], 2)
            embedded = client.post(
                "/v1/embed",
                data={"embedding_format": "base64", "multiple_faces": "largest"},
                files={"image": ("p.jpg", probe)},
            ).json()
            vector, model = embedded["faces"][0]["embedding"], embedded["model"]

            by_image = client.post(
                "/v1/identify",
                data={"gallery": "g", "top_k": "3"},
                files={"image": ("p.jpg", probe)},
            ).json()
            r = client.post(
                "/v1/identify",
                json={"gallery": "g", "top_k": 3, "embedding": vector, "model": model},
            )
            assert r.status_code == 200, r.text
            by_vector = r.json()
            assert by_vector["faces"][0]["match"] == PEOPLE[1]
            assert "box" not in by_vector["faces"][0]
            assert by_vector["faces"][0]["candidates"] == by_image["faces"][0]["candidates"]

            image_answer = client.post(
                "/v1/verify",
                data={"gallery": "g", "subject_id": PEOPLE[1]},
                files={"image1": ("p.jpg", probe)},
            ).json()
            r = client.post(
                "/v1/verify",
                json={"gallery": "g", "subject_id": PEOPLE[1], "embedding": vector, "model": model},
            )
            assert r.status_code == 200, r.text
            assert r.json()["similarity"] == image_answer["similarity"]
            assert r.json()["match"] is True and "face1" not in r.json()
            r = client.post(
                "/v1/verify",
                data={"embedding": vector, "model": model},
                files={"image2": ("q.jpg", photo(PEOPLE[1], 3))},
            )
            assert r.status_code == 200 and r.json()["match"] is True

            raw = np.frombuffer(base64.b64decode(vector), "<f4")
            short = base64.b64encode(raw[:-1].tobytes()).decode()
            doubled = base64.b64encode((raw * 2).astype("<f4").tobytes()).decode()
            cases = [
                ({"embedding": vector, "model": "other@000000000000"}, 409, "model_mismatch"),
                ({"embedding": vector}, 422, "missing_field"),
                ({"embedding": short, "model": model}, 422, "invalid_embedding"),
                ({"embedding": doubled, "model": model}, 422, "invalid_embedding"),
                ({"embedding": "%%%", "model": model}, 422, "invalid_embedding"),
                (
                    {
                        "embedding": vector,
                        "model": model,
                        "image": base64.b64encode(probe).decode(),
                    },
                    400,
                    "ambiguous_request",
                ),
            ]
            for extra, status, code in cases:
                r = client.post("/v1/identify", json={"gallery": "g", **extra})
                assert (r.status_code, r.json()["error"]["code"]) == (status, code), extra
            r = client.post("/v1/identify", json={"gallery": "g"})
            assert r.json()["error"]["code"] == "missing_field"
    finally:
        server.stop()
