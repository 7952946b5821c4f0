"""The FAISS gallery index on its own: exact, IVF and HNSW; deletes; snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from service.config import Settings
from service.gallery import index as index_module
from service.gallery import open_gallery
from service.gallery.index import GalleryIndex, SnapshotError

DIM = 64


@pytest.fixture(autouse=True)
def small_ivf(monkeypatch):
    """Train IVF from 300 faces (instead of 10k) so the tests exercise real IVF search."""
    monkeypatch.setattr(index_module, "IVF_MIN_TRAIN", 300)


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def filled(kind: str, n: int = 600, faces_per_subject: int = 3, seed: int = 0, dim: int = DIM):
    rng = np.random.default_rng(seed)
    vectors = unit(rng, n, dim)
    ids = np.arange(1000, 1000 + n, dtype=np.int64)
    subjects = [f"s{i // faces_per_subject}" for i in range(n)]
    index = GalleryIndex(dim, "m", kind)
    assert index.add(ids, subjects, vectors) == n
    return index, ids, subjects, vectors


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_every_kind_finds_the_enrolled_face_and_fuses_subjects(kind):
    index, ids, subjects, vectors = filled(kind)
    if kind == "ivf":
        assert index._trained_at == len(ids)
    results = index.search(vectors[:50], 5)
    top1 = [r[0]["face_id"] for r in results]
    recall = np.mean(np.array(top1) == ids[:50])
    assert recall >= (1.0 if kind == "flat" else 0.9)
    for hits in results:
        assert len({h["subject_id"] for h in hits}) == len(hits) == 5
        assert all(index.subject_of(h["face_id"]) == h["subject_id"] for h in hits)
    assert index.add(ids[:10], subjects[:10], vectors[:10]) == 0  # ids already there
    assert len(index) == len(ids) and index.subjects == 200


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_removed_faces_never_come_back(kind, monkeypatch):
    monkeypatch.setattr(index_module, "HNSW_REBUILD_FRACTION", 0.5)
    index, ids, _, vectors = filled(kind)
    gone = ids[:30]
    assert index.remove(gone) == 30
    assert index.remove(gone) == 0
    assert index.remove_subject("s20") == 3  # faces 60..62
    results = index.search(vectors[:70], 3)
    returned = {h["face_id"] for hits in results for h in hits}
    assert not returned & (set(gone.tolist()) | set(ids[60:63].tolist()))
    assert "s20" not in {h["subject_id"] for hits in results for h in hits}
    assert len(index) == len(ids) - 33
    assert index.face_ids().tolist() == sorted(
        set(ids.tolist()) - set(gone.tolist()) - set(ids[60:63].tolist())
    )


def test_ivf_trains_once_large_enough_and_keeps_exact_matches(monkeypatch):
    monkeypatch.setattr(index_module, "IVF_MIN_TRAIN", 500)
    index, ids, _, _ = filled("ivf", n=400)
    assert index._trained_at == 0  # still exact below the threshold
    rng = np.random.default_rng(1)
    more = unit(rng, 200)
    index.add(np.arange(5000, 5200), [f"t{i}" for i in range(200)], more)
    assert index._trained_at == 600 and index._ivf.nlist == index_module.ivf_lists(600) > 1
    assert index.remove(ids[:5]) == 5
    hits = index.search(more[:20], 1)
    assert np.mean([h[0]["face_id"] for h in hits] == np.arange(5000, 5020)) >= 0.9


@pytest.mark.parametrize("dim,codes", [(DIM, "SQ8"), (512, "PQ128x4fs")])
def test_ivf_short_list_is_reranked_by_exact_scores(dim, codes):
    """Through the accelerator every similarity is the exact cosine (float32 dot product
    of the stored vectors), in that order, and the exact nearest face is found when every
    list is probed; the codes themselves (8-bit, or 4-bit PQ for L2 above 256-d) are
    approximate."""
    index, ids, subjects, vectors = filled("ivf", n=2000, faces_per_subject=1, dim=dim)
    state = index.describe()
    assert state["active"] == "ivf" and state["codes"] == codes and index._ivf is not None
    rng = np.random.default_rng(5)
    queries = vectors[:40] + 0.6 * unit(rng, 40, dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    row_of = {int(f): r for r, f in enumerate(ids)}
    index.nprobe = state["nlist"]  # every list: only the codes can cost recall
    coded_scores, coded = index._ivf.search(queries, 1)
    if codes != "SQ8":  # L2 on unit vectors: |q - x|^2 = 2 - 2 q.x
        coded_scores = 1 - coded_scores / 2
    worst_code_error = 0.0
    for query, hits, code_score in zip(
        queries, index.search(queries, 5), coded_scores, strict=True
    ):
        exact = [float(vectors[row_of[h["face_id"]]] @ query) for h in hits]
        assert [h["similarity"] for h in hits] == pytest.approx(exact, abs=1e-5)
        assert exact == sorted(exact, reverse=True)
        assert exact[0] == pytest.approx(float(np.max(vectors @ query)), abs=1e-5)
        worst_code_error = max(worst_code_error, abs(code_score[0] - exact[0]))
    assert worst_code_error > 1e-5  # the codes alone are approximate: the re-rank matters


def test_ivf_accelerator_is_checked_with_the_exact_index():
    """A face the accelerator lost is missing and one it holds twice is extra, although the
    exact index is intact (what /v1/info?check_index=true reports)."""
    index, ids, _, vectors = filled("ivf")
    held, _ = index.contents()
    assert sorted(held.tolist()) == ids.tolist()
    index._ivf.remove_ids(np.array([ids[3]], dtype=np.int64))
    index._ivf.add_with_ids(vectors[7:8], ids[7:8])
    held, _ = index.contents()
    assert ids[3] not in held.tolist() and held.tolist().count(int(ids[7])) == 2


@pytest.mark.parametrize("dim", [DIM, 512])
def test_ivf_snapshot_holds_the_accelerator(tmp_path, dim):
    index, ids, _, vectors = filled("ivf", dim=dim)
    index.save(tmp_path / "g", seq=1, gallery="g")
    assert (tmp_path / "g.ivf").is_file()
    loaded, _ = GalleryIndex.load(tmp_path / "g", "ivf")
    assert loaded._ivf is not None and loaded._ivf.ntotal == len(ids)
    assert loaded.describe() == index.describe()
    assert loaded.search(vectors[:20], 4) == index.search(vectors[:20], 4)
    (tmp_path / "g.ivf").write_bytes((tmp_path / "g.ivf").read_bytes()[:-8])
    with pytest.raises(SnapshotError, match="checksum"):
        GalleryIndex.load(tmp_path / "g", "ivf")
    (tmp_path / "g.ivf").unlink()
    with pytest.raises(SnapshotError, match="cannot read"):
        GalleryIndex.load(tmp_path / "g", "ivf")


def test_hnsw_rebuilds_once_tombstones_pile_up(monkeypatch):
    monkeypatch.setattr(index_module, "HNSW_REBUILD_FRACTION", 0.2)
    index, ids, _, vectors = filled("hnsw", n=300)
    index.remove(ids[:50])
    assert len(index._tombstones) == 50 and index._index.ntotal == 300
    index.remove(ids[50:70])  # 70 > 0.2 * 300: rebuilt without them
    assert not index._tombstones and index._index.ntotal == 230
    hits = index.search(vectors[70:90], 1)
    assert [h[0]["face_id"] for h in hits] == ids[70:90].tolist()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_snapshot_round_trip_and_checksum(kind, tmp_path):
    index, ids, _, vectors = filled(kind)
    index.remove(ids[:7])
    index.save(tmp_path / "g", seq=42, gallery="g")
    loaded, sidecar = GalleryIndex.load(tmp_path / "g", kind)
    assert sidecar["seq"] == 42 and sidecar["count"] == len(index)
    assert np.array_equal(loaded.face_ids(), index.face_ids())
    assert loaded.search(vectors[:20], 4) == index.search(vectors[:20], 4)
    with pytest.raises(SnapshotError):
        GalleryIndex.load(tmp_path / "g", "flat" if kind != "flat" else "hnsw")
    (tmp_path / "g.faiss").write_bytes(b"garbage")
    with pytest.raises(SnapshotError):
        GalleryIndex.load(tmp_path / "g", kind)


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "auto"])
def test_service_runs_with_each_index_type(kind, tmp_path):
    settings = Settings(data_dir=tmp_path, index_type=kind, faiss_gpu=False, sync_interval_s=0.05)
    service = open_gallery(settings)
    service.start()
    try:
        rng = np.random.default_rng(2)
        vectors = unit(rng, 20)
        for i, vector in enumerate(vectors):
            service.upsert_subject("g", f"s{i % 5}", None, "m")
            service.add_face("g", f"s{i % 5}", vector, "m", {})
        service.delete_subject("g", "s0")
        hits = service.search("g", vectors[1:2], 3, "m")[0]
        assert hits[0]["subject_id"] == "s1" and "s0" not in {h["subject_id"] for h in hits}
        assert service.stats()["index_type"] == kind
    finally:
        service.stop()
    again = open_gallery(settings)
    again.start()
    try:
        assert again.source == "snapshot"
        assert again.index_face_ids("g").tolist() == again.store.face_ids("g").tolist()
    finally:
        again.stop()


def test_unknown_index_type_is_refused(tmp_path):
    with pytest.raises(ValueError):
        open_gallery(Settings(data_dir=tmp_path, index_type="annoy"))


def test_ivf_nprobe_setting_reaches_the_index_and_changes_recall(tmp_path, monkeypatch):
    """FACEGATE_IVF_NPROBE is what a service's ivf index probes, also after a snapshot load."""
    assert Settings().ivf_nprobe == 0  # default: tuned for target_recall
    monkeypatch.setenv("FACEGATE_IVF_NPROBE", "1")
    settings = Settings(data_dir=tmp_path, index_type="ivf", faiss_gpu=False, sync_interval_s=0.05)
    assert settings.ivf_nprobe == 1
    rng = np.random.default_rng(3)
    vectors = unit(rng, 400)
    queries = vectors + 0.08 * rng.standard_normal(vectors.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    service = open_gallery(settings)
    service.start()
    try:
        for i, vector in enumerate(vectors):
            service.upsert_subject("g", f"s{i}", None, "m")
            service.add_face("g", f"s{i}", vector, "m", {})
        index = service.replica.indexes["g"]
        assert index.nprobe == 1 and index._trained_at == 300 and index._ivf.nlist > 1
        found = [h[0]["subject_id"] for h in service.search("g", queries, 1, "m")]
        recall_one = np.mean(np.array(found) == [f"s{i}" for i in range(400)])
    finally:
        service.stop()
    monkeypatch.setenv("FACEGATE_IVF_NPROBE", "1000")  # above nlist: every list is probed
    again = open_gallery(Settings(data_dir=tmp_path, index_type="ivf", faiss_gpu=False))
    again.start()
    try:
        assert again.source == "snapshot" and again.replica.indexes["g"].nprobe == 1000
        found = [h[0]["subject_id"] for h in again.search("g", queries, 1, "m")]
        recall_all = np.mean(np.array(found) == [f"s{i}" for i in range(400)])
    finally:
        again.stop()
    assert recall_all == 1.0 and recall_one < 0.9  # one probed list misses many true matches
    monkeypatch.setenv("FACEGATE_IVF_NPROBE", "-1")  # 0 is valid: tuned for a target recall
    with pytest.raises(ValueError):
        Settings()
    with pytest.raises(ValueError):
        GalleryIndex(DIM, "m", "ivf", nprobe=-1)


def test_a_writer_is_not_starved_by_a_stream_of_searches():
    """A thread searching in a tight loop (read lock released and at once re-taken) must
    not keep a writer out: the auto index's switch waited for ever behind such a loop."""
    import threading
    import time

    from service.gallery.index import _RWLock

    lock, stop, got = _RWLock(), threading.Event(), threading.Event()

    def searches() -> None:
        while not stop.is_set():
            with lock.read():  # a search: the GIL released while FAISS works
                time.sleep(0.002)

    def write() -> None:
        with lock.write():
            got.set()

    reader = threading.Thread(target=searches, daemon=True)
    reader.start()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert got.wait(5), "the writer never got the lock"
    finally:
        stop.set()
        reader.join(5)
        writer.join(5)
