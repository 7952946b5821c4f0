"""The clustering use case on a real store with the real card: a rerun lets new faces join
the cluster they belong to (and keeps the old ones where they are), and a gallery over the
request bound is refused without a change."""

from __future__ import annotations

import numpy as np
import pytest

from service.config import MANIFEST_PATH, Settings
from service.gallery import GalleryService
from service.gallery.errors import GalleryNotFound
from service.gallery.store import NewPhotoFace
from service.registry import Registry
from service.usecases import people
from tests.conftest import SHARED_MODELS

MODEL = "mobilefacenet_peer_128d"


def faces_around(rng, centre: np.ndarray, n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        v = centre + 0.05 * rng.standard_normal(centre.size)  # cosine about 0.75
        out.append((v / np.linalg.norm(v)).astype(np.float32))
    return out


def add(gallery: GalleryService, photo_id: str, vector: np.ndarray) -> int:
    face = NewPhotoFace(vector, [0, 0, 50, 50], [[1, 1]] * 5, {}, True)
    photo, _, _ = people.people_store(gallery).add_photo("lib", MODEL, photo_id, 9, 9, [face])
    return photo["faces"][0]["face_id"]


@pytest.fixture
def gallery(tmp_path):
    settings = Settings(data_dir=tmp_path, faiss_gpu=False)
    service = GalleryService.offline(settings)
    service.create_gallery("lib", MODEL, 128)
    yield service
    service.stop()


def test_new_faces_join_their_cluster_and_the_bound_refuses(gallery):
    card, _ = Registry(MANIFEST_PATH, [SHARED_MODELS]).resolve(MODEL)
    settings = gallery.settings
    rng = np.random.default_rng(1)
    centres = [c / np.linalg.norm(c) for c in rng.standard_normal((2, 128))]
    first = [add(gallery, f"a{k}", v) for k, v in enumerate(faces_around(rng, centres[0], 4))]
    other = [add(gallery, f"b{k}", v) for k, v in enumerate(faces_around(rng, centres[1], 4))]

    with pytest.raises(people.TooManyFaces):
        people.run_clustering(gallery, card, settings, "lib", MODEL, max_faces=7)
    assert people.list_clusters(gallery, "lib")[0] == []  # nothing changed

    run = people.run_clustering(gallery, card, settings, "lib", MODEL)
    assert run.clusters_created == 2 and run.outliers == 0
    found = {tuple(c["face_ids"]): c["cluster_id"] for c in people.list_clusters(gallery, "lib")[0]}
    assert set(found) == {tuple(first), tuple(other)}
    later = [add(gallery, f"a-new{k}", v) for k, v in enumerate(faces_around(rng, centres[0], 2))]
    rerun = people.run_clustering(gallery, card, settings, "lib", MODEL)
    assert rerun.faces_joined == 2 and rerun.clusters_created == 0
    joined = people.get_cluster(gallery, "lib", found[tuple(first)])
    assert joined["face_ids"] == first + later
    assert people.get_cluster(gallery, "lib", found[tuple(other)])["face_ids"] == other


def test_a_restore_is_one_transaction_people_records_included(gallery):
    """A restore writes subjects, faces and people records in one transaction: one whose
    people part fails at write time (here a real primary-key clash of two photo records)
    leaves nothing at all, and the same file unaltered restores whole."""
    import dataclasses
    import io

    from service.gallery import transfer

    rng = np.random.default_rng(2)
    centre = rng.standard_normal(128)
    centre /= np.linalg.norm(centre)
    gallery.upsert_subject("lib", "ann", None, MODEL)
    store = people.people_store(gallery)
    vectors = faces_around(rng, centre, 3)
    assigned = NewPhotoFace(vectors[0], [0, 0, 50, 50], [[1, 1]] * 5, {}, True, subject_id="ann")
    ids = [people.photo_id(bytes([k])) for k in range(3)]  # photos go by their sha256
    photo, _, seq = store.add_photo("lib", MODEL, ids[0], 9, 9, [assigned])
    gallery.sync_to(seq)
    loose = [add(gallery, ids[k], v) for k, v in enumerate(vectors[1:], start=1)]
    store.apply_clusters("lib", {}, [loose])
    out = io.BytesIO()
    transfer.write_export(store, "lib", out)
    export = transfer.read_export(io.BytesIO(out.getvalue()))
    assert len(export.people["photo"]) == 3 and len(export.people["cluster"]) == 1
    assert len(export.faces) == 1  # ann's enrolled face

    head = store.head_seq()
    clash = dataclasses.replace(
        export, people={**export.people, "photo": export.people["photo"] * 2}
    )
    with pytest.raises(Exception) as failed:
        transfer.restore(gallery, clash, MODEL, None, "copy")
    assert "unique" in str(failed.value).lower() or "primary" in str(failed.value).lower()
    assert [g["name"] for g in gallery.list_galleries()] == ["lib"]
    assert store.head_seq() == head  # no change-log entry either
    with pytest.raises(GalleryNotFound):  # nor any of its subjects, faces, photos, clusters
        store.list_clusters("copy", 10, None)

    summary = transfer.restore(gallery, export, MODEL, None, "copy")
    assert summary["faces"] == 1 and summary["people"]["photo_face"] == 3
    ops = [(c.op, c.gallery) for c in store.changes_after(head)]
    assert ops == [("add", "copy"), ("people", "copy")]
    (cluster,), _ = store.list_clusters("copy", 10, None)
    assert cluster["size"] == 2 and cluster["subject_id"] is None
    (enrolled,) = store.get_subject("copy", "ann")["faces"]
    restored = store.get_photo("copy", ids[0])
    assert restored is not None
    assert restored["faces"][0]["enrolled_face_id"] == enrolled["face_id"]
