"""Identification through the gallery on real photos (CelebA from ``../shared``).

Embeddings come from the shared 128-d reference recogniser, aligned on YuNet
landmarks with InsightFace's ArcFace-template warp, independently of the
service pipeline, so this checks the gallery (storage, FAISS, max fusion,
deletes) on the kind of vectors it will really hold.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from service.config import Settings
from service.gallery import open_gallery
from tests.conftest import CELEBA, SHARED_MODELS

PEOPLE = 30
MODEL = "mobilefacenet_peer_128d"


@pytest.fixture(scope="module")
def celeba_embeddings() -> dict[str, list[np.ndarray]]:
    """Three embeddings (two to enrol, one probe) for each of ``PEOPLE`` identities."""
    import cv2
    import onnxruntime as ort
    from insightface.utils.face_align import norm_crop

    detector = cv2.FaceDetectorYN.create(
        str(SHARED_MODELS / "yunet_2023mar.onnx"), "", (320, 320), 0.6, 0.3, 50
    )
    recogniser = ort.InferenceSession(
        str(SHARED_MODELS / "mobilefacenet_peer_128d.onnx"), providers=["CPUExecutionProvider"]
    )
    photos = collections.defaultdict(list)
    for line in (CELEBA / "identities.txt").read_text().splitlines()[1:]:
        if line.strip():
            path, identity = line.split()
            photos[identity].append(path)

    def embed(path: str) -> np.ndarray | None:
        image = cv2.imread(str(CELEBA / "images" / path))
        detector.setInputSize((image.shape[1], image.shape[0]))
        _, faces = detector.detect(image)
        if faces is None:
            return None
        face = max(faces, key=lambda row: row[2] * row[3])
        crop = norm_crop(image, face[4:14].reshape(5, 2), 112)
        x = (cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32) - 127.5) / 128.0
        vector = recogniser.run(None, {"input": x.transpose(2, 0, 1)[None]})[0][0]
        return (vector / np.linalg.norm(vector)).astype(np.float32)

    result = {}
    for identity in sorted(photos, key=lambda i: (-len(photos[i]), i)):
        vectors = [v for v in map(embed, photos[identity][:4]) if v is not None][:3]
        if len(vectors) == 3:
            result[identity] = vectors
        if len(result) == PEOPLE:
            break
    assert len(result) == PEOPLE
    return result


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_identifies_real_people_by_their_best_face(tmp_path, celeba_embeddings):
    service = open_gallery(Settings(data_dir=tmp_path, faiss_gpu=False))
    service.start()
    try:
        for identity, vectors in celeba_embeddings.items():
            service.upsert_subject("celeba", identity, {"source": "celeba"}, MODEL)
            for vector in vectors[:2]:
                service.add_face("celeba", identity, vector, MODEL, {})
        identities = list(celeba_embeddings)
        probes = np.stack([celeba_embeddings[i][2] for i in identities])
        results = service.search("celeba", probes, 5, MODEL)

        top1 = [hits[0]["subject_id"] for hits in results]
        accuracy = np.mean([t == i for t, i in zip(top1, identities, strict=True)])
        assert accuracy >= 0.8, f"rank-1 accuracy {accuracy:.2f} on {PEOPLE} people"
        for probe, hits in zip(probes, results, strict=True):
            assert len({h["subject_id"] for h in hits}) == len(hits) == 5
            best = max(float(v @ probe) for v in celeba_embeddings[hits[0]["subject_id"]][:2])
            assert hits[0]["similarity"] == pytest.approx(best, abs=1e-5)  # max fusion

        # Deleting a correctly identified person removes them from every result.
        found = next(i for t, i in zip(top1, identities, strict=True) if t == i)
        service.delete_subject("celeba", found)
        again = service.search("celeba", probes, 5, MODEL)
        assert all(found not in {h["subject_id"] for h in hits} for hits in again)
    finally:
        service.stop()
