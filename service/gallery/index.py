"""A gallery's FAISS index: face ids are FAISS ids, subjects are found by best face.

One :class:`GalleryIndex` per gallery holds the FAISS index together with the
face -> subject mapping (owned here, next to the index, not in a parallel
global).  Scores are inner products of L2-normalised vectors, i.e. cosine
similarities.

Index types (``settings.index_type``), each one strategy object in
:mod:`service.gallery.index_kinds` chosen once when the index is built (from
:class:`IndexSettings`); snapshot files are read and written by
:mod:`service.gallery.snapshots`:

``flat`` (default)
    ``IndexIDMap2`` over ``IndexFlatIP``: exact search, recall 1.0; cost is
    linear in gallery size (see BENCHMARKS.md for measured latency).
``ivf``
    The exact index above, plus an inverted-file *accelerator* with ``nlist =
    4·sqrt(n)`` lists of compressed codes (:func:`accelerator_codes`): 8-bit scalar
    quantisation (one byte per dimension) up to ``SQ8_MAX_DIM`` dimensions, 4-bit
    fast-scan product quantisation (half a byte per 4 dimensions, for L2 distance, which
    on unit vectors orders as the inner product does) above.  A search probes ``nprobe``
    of the lists (``settings.ivf_nprobe``; 0: tuned for ``target_recall``) over the
    codes for a short list of ``RERANK`` times
    the faces wanted, then re-ranks that list by exact scores read from the exact
    index, so every similarity returned is exact and only a true match in an
    unprobed list (or pushed off the short list by quantisation) is missed:
    sub-linear search, recall below 1.0 (see BENCHMARKS.md).  The gallery stays
    exact until it holds ``IVF_MIN_TRAIN`` faces, is then trained on its own
    vectors, and is re-trained whenever it has grown ``IVF_RETRAIN_GROWTH``-fold
    since.  Deletes are native (``remove_ids``) in both.
``auto``
    Exact (as ``flat``) while the gallery is small; once it holds
    :func:`auto_switch_faces` faces (where exact search costs about
    ``AUTO_EXACT_CPU_MS`` of CPU per query, measured: BENCHMARKS.md) it gains the
    ``ivf`` accelerator, with a probe count chosen by :func:`tune_nprobe` for
    ``target_recall``.  Training and every later re-training run in a background
    thread: the current index answers (and takes writes) meanwhile, and the new one
    replaces it once it has caught up with the writes made during its build.
``hnsw``
    ``IndexIDMap2`` over ``IndexHNSWFlat`` (M = ``HNSW_M``): the fastest search
    at high recall, but the most memory per vector and slow inserts.  HNSW
    cannot remove vectors, so deleted faces become *tombstones*: they stay in
    the graph, are filtered out of results (the search over-fetches to make up
    for them), and the graph is rebuilt from the live vectors once tombstones
    exceed ``HNSW_REBUILD_FRACTION`` of it.

Search returns, per query, up to ``top_k`` **subjects**: each subject is scored
by its best face (max fusion).  The index over-fetches faces and widens the
fetch until it has ``top_k`` distinct subjects or has seen every face.

With ``gpu=True`` (set when ``faiss.get_num_gpus() > 0`` and
``settings.faiss_gpu``) a flat index's vectors are mirrored onto the GPU
(``GpuIndexFlatIP``) for search; the CPU index stays the source of truth and
the mirror is re-uploaded lazily after a change.  This path needs a GPU build
of FAISS and is not exercised by the CPU test-suite.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import faiss
import numpy as np

from service.config import INDEX_TYPES, IndexType, Settings
from service.gallery.index_kinds import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    IVF_RETRAIN_GROWTH,
    IndexKind,
    hnsw_of,
    index_kind,
)
from service.gallery.snapshot_files import (
    SNAPSHOT_FORMAT,
    SnapshotError,
    read_index_files,
    write_index_files,
)

log = logging.getLogger("facegate.gallery")

__all__ = [
    "HNSW_EF_CONSTRUCTION",
    "HNSW_M",
    "INDEX_TYPES",
    "IVF_RETRAIN_GROWTH",
    "SNAPSHOT_FORMAT",
    "GalleryIndex",
    "IndexSettings",
    "SnapshotError",
]
IVF_MIN_TRAIN = 10_000  # ivf: the size of the first training
IVF_NPROBE = 32
IVF_TRAIN_PER_LIST = 64  # k-means sample: this many vectors per list (FAISS advises 30-256)
IVF_TRAIN_ITERATIONS = 10
IVF_LISTS_PER_SQRT = 4  # nlist = 4·sqrt(n): 4,000 lists at 1M faces (FAISS advises 4-16·sqrt)
RERANK = 2  # ivf: the short list from the codes holds RERANK x the faces asked for ...
SHORTLIST_MIN = 64  # ... and at least this many, re-ranked by exact scores
#: ivf codes: 8-bit scalar quantisation up to this many dimensions, 4-bit fast-scan PQ above
#: (at 1M real faces, 512-d: 3.1 vs 19.4 ms for the same recall; BENCHMARKS.md)
SQ8_MAX_DIM = 256
HNSW_EF_SEARCH = 128
HNSW_REBUILD_FRACTION = 0.2
OVERFETCH = 4
GPU_MAX_K = 2048  # FAISS GPU k-selection limit; larger fetches run on the CPU index
#: ``auto``: exact search costs ~0.17 ns of CPU per face and dimension on the 2-core VM
#: (84.7 ms at 1M x 512-d, 2.29 ms at 100k x 128-d: BENCHMARKS.md); it switches to IVF
#: where an exact search would cost this much.
AUTO_EXACT_CPU_MS = 2.0
EXACT_NS_PER_FACE_DIM = 0.17
TARGET_RECALL = 0.99
TUNE_QUERIES = 400

#: the FAISS index that holds a gallery's vectors: an id map over a flat or HNSW index
FaissIndex: TypeAlias = "faiss.IndexIDMap2"
#: the inverted-file accelerator of an ``ivf`` (or switched ``auto``) gallery
Accelerator: TypeAlias = "faiss.IndexIVF"
#: exact vectors of the given face ids (one row each)
Lookup: TypeAlias = "Callable[[np.ndarray], np.ndarray]"


def auto_switch_faces(dim: int) -> int:
    """Gallery size at which ``auto`` leaves exact search: ~23k faces at 512-d, ~92k at 128-d
    (never under ``IVF_MIN_TRAIN``)."""
    faces = AUTO_EXACT_CPU_MS * 1e6 / (EXACT_NS_PER_FACE_DIM * dim)
    return max(IVF_MIN_TRAIN, int(faces))


def nearest_others(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Row of each ``vectors[rows]``'s nearest other vector, by exact search."""
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, found = exact.search(vectors[rows], 2)
    return np.where(found[:, 0] == rows, found[:, 1], found[:, 0])


def rerank(
    queries: np.ndarray, shortlist: np.ndarray, lookup: Lookup, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the ``k`` best of its short-listed face ids (``-1``: none) by exact inner
    product with the vectors ``lookup`` returns: (scores, ids), best first, padded with
    ``-inf`` / ``-1``."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    found = np.full((len(queries), k), -1, dtype=np.int64)
    for row, (query, ids) in enumerate(zip(queries, shortlist, strict=True)):
        ids = ids[ids >= 0]
        if ids.size:
            exact = lookup(ids) @ query
            best = np.argsort(-exact, kind="stable")[:k]
            scores[row, : best.size] = exact[best]
            found[row, : best.size] = ids[best]
    return scores, found


def accelerated_search(
    ivf: Accelerator, queries: np.ndarray, k: int, nprobe: int, lookup: Lookup
) -> tuple[np.ndarray, np.ndarray]:
    """``ivf``'s short list (``nprobe`` lists' codes) re-ranked by exact scores."""
    depth = min(int(ivf.ntotal), max(RERANK * k, SHORTLIST_MIN))
    _, shortlist = ivf.search(queries, depth, params=_ivf_params(min(nprobe, ivf.nlist)))
    return rerank(queries, shortlist, lookup, k)


def tune_nprobe(
    index: Accelerator,
    vectors: np.ndarray,
    ids: np.ndarray,
    target: float,
    queries: int = TUNE_QUERIES,
    seed: int = 0,
) -> tuple[int, float]:
    """The fewest probes with which ``index``'s search reaches, for at least a ``target``
    share of a sample of the gallery's own vectors, the list holding each one's exact
    nearest *other* vector; (nprobe, that share).

    The nearest other face of an enrolled face is about as far from it as a new photo of
    a person is from the enrolled one, so this measures the probing a real query needs
    without any query photos.  It measures the inverted file alone (which lists a search
    visits, from the coarse quantiser), not the codes: the short list's exact re-rank
    answers for those, and coarse 4-bit codes would otherwise count as probing misses."""
    n = len(ids)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, min(queries, n), replace=False))
    quantizer = index.quantizer
    assert quantizer is not None  # a trained IVF index has its coarse quantiser
    _, home = quantizer.search(vectors[nearest_others(vectors, rows)], 1)
    _, visited = quantizer.search(vectors[rows], index.nlist)  # lists in probe order
    needed = 1 + np.argmax(visited == home, axis=1)  # probes until the home list is visited
    nprobe = int(np.sort(needed)[max(0, math.ceil(target * len(rows)) - 1)])
    return nprobe, float(np.mean(needed <= nprobe))


def accelerator_codes(dim: int) -> tuple[str, int]:
    """(FAISS codes, metric) of the ``ivf`` accelerator for ``dim``-dimensional vectors:
    ``SQ8`` (inner product) up to ``SQ8_MAX_DIM``, else ``PQ{dim/4}x4fs`` (4-bit fast
    scan, L2: its look-up tables are built for it; on unit vectors the order is the
    inner product's).  The re-rank computes exact inner products either way."""
    if dim <= SQ8_MAX_DIM or dim % 4:
        return "SQ8", faiss.METRIC_INNER_PRODUCT
    return f"PQ{dim // 4}x4fs", faiss.METRIC_L2


def build_ivf(dim: int, ids: np.ndarray, vectors: np.ndarray) -> Accelerator:
    """The accelerator (:func:`accelerator_codes`), trained on (a sample of) ``vectors``
    and holding them all."""
    n = len(ids)
    nlist = ivf_lists(n)
    codes, metric = accelerator_codes(dim)
    index = faiss.index_factory(dim, f"IVF{nlist},{codes}", metric)
    assert isinstance(index, faiss.IndexIVF)  # faiss returns it downcast
    index.cp.niter = IVF_TRAIN_ITERATIONS
    rng = np.random.default_rng(0)
    cap = IVF_TRAIN_PER_LIST * nlist
    sample = vectors if n <= cap else vectors[np.sort(rng.choice(n, cap, replace=False))]
    index.train(sample)
    index.add_with_ids(vectors, ids)
    return index


class _RWLock:
    """Many concurrent searches, or one mutation at a time.

    Writers go first: once a writer waits, new readers wait behind it. Otherwise a steady
    stream of searches (each releasing and at once re-taking the read lock) would keep a
    writer, such as the switch to a freshly trained index, waiting for ever. Reads do not
    nest (a reader never takes the lock again), so this cannot deadlock."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _ivf_params(nprobe: int) -> faiss.SearchParametersIVF:
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    return params


def _remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove ``ids`` from ``index``; the selector FAISS's own wrapper builds for an id array."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    return index.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))


def _flat_vectors(index: faiss.Index) -> np.ndarray:
    """A copy of the vectors stored in an ``IndexFlat``."""
    flat = faiss.downcast_index(index)
    assert isinstance(flat, faiss.IndexFlat)
    return (
        faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d).copy()
    )


def _ivf_ids(ivf: Accelerator) -> np.ndarray:
    """The face ids an IVF index holds, read from its inverted lists (no order)."""
    lists = ivf.invlists
    assert lists is not None  # an IndexIVF always owns its inverted lists
    ids = [
        faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).copy()
        for n in range(ivf.nlist)
        if lists.list_size(n)
    ]
    return np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)


def ivf_lists(n: int) -> int:
    """IVF list count for ``n`` vectors: ``4·sqrt(n)``, at least 39 training points per list."""
    return int(max(1, min(IVF_LISTS_PER_SQRT * math.sqrt(n), n / 39, 65536)))


@dataclass(frozen=True)
class IndexSettings:
    """How every index of a replica is built and loaded: the kind, the GPU mirror, the ivf
    probes (0: tuned), the target recall of tuning and auto's switch size (0: measured)."""

    kind: IndexType = "flat"
    gpu: bool = False
    nprobe: int = IVF_NPROBE
    target_recall: float = 0.0
    switch_faces: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, gpu: bool) -> IndexSettings:
        return cls(
            kind=settings.index_type,
            gpu=gpu,
            nprobe=settings.ivf_nprobe,
            target_recall=settings.target_recall,
            switch_faces=settings.auto_switch_faces,
        )

    def build(self, dim: int, model_id: str) -> GalleryIndex:
        """An empty index for ``dim``-d embeddings of ``model_id``."""
        return GalleryIndex(dim, model_id, **vars(self))

    def load(self, prefix: Path) -> tuple[GalleryIndex, dict]:
        """The snapshot at ``prefix`` (:meth:`GalleryIndex.load`)."""
        return GalleryIndex.load(prefix, **vars(self))


class GalleryIndex:
    """The searchable, derived state of one gallery."""

    def __init__(
        self,
        dim: int,
        model_id: str,
        kind: str = "flat",
        gpu: bool = False,
        nprobe: int = IVF_NPROBE,
        target_recall: float = 0.0,
        switch_faces: int = 0,
    ) -> None:
        """``nprobe`` 0 (ivf) or ``kind="auto"``: the probe count is tuned for
        ``target_recall`` (default ``TARGET_RECALL``) whenever the index is trained;
        ``switch_faces`` (auto): the size where it leaves exact search (0: measured
        default, :func:`auto_switch_faces`)."""
        self._kind: IndexKind = index_kind(kind)
        if int(nprobe) < 0:
            raise ValueError(f"nprobe must be at least 1 (0: tuned), got {nprobe!r}")
        if not 0.0 <= target_recall <= 1.0:
            raise ValueError(f"target recall must lie in [0, 1], got {target_recall!r}")
        self.dim = int(dim)
        self.model_id = model_id
        self.kind: IndexType = self._kind.name
        tuned = self._kind.always_tuned or int(nprobe) == 0
        self.target_recall = (target_recall or TARGET_RECALL) if tuned else 0.0
        self.nprobe = int(nprobe) or IVF_NPROBE  # ivf: lists probed per search (capped at nlist)
        self.tuned_recall: float | None = None  # recall measured when nprobe was tuned
        self.switch_faces = int(switch_faces) or auto_switch_faces(self.dim)
        self.switches = 0  # auto: background trainings swapped in
        self.ef_search = HNSW_EF_SEARCH  # hnsw: candidates kept while searching the graph
        self._trainer: threading.Thread | None = None
        self._written: dict[int, np.ndarray | None] | None = None
        self.gpu = bool(gpu) and self._kind.gpu_mirror and faiss.get_num_gpus() > 0
        self._index: FaissIndex = self._kind.empty(self.dim)
        self._ivf: Accelerator | None = None  # ivf / switched auto: the accelerator
        self._trained_at = 0  # ivf: gallery size when the coarse quantiser was trained
        self._subject_of: dict[int, str] = {}
        self._faces_of: dict[str, set[int]] = {}
        self._tombstones: set[int] = set()
        self._lock = _RWLock()
        self._gpu_index: faiss.GpuIndex | None = None
        self._gpu_ids: np.ndarray | None = None
        self._gpu_resources: faiss.StandardGpuResources | None = None
        self._gpu_lock = threading.Lock()

    # --- construction -----------------------------------------------------------
    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) the exact index holds (copies)."""
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        return ids, _flat_vectors(self._index.index)

    def _train_ivf(self) -> None:
        """(Re)build the accelerator from the exact vectors, training a new quantiser."""
        ids, vectors = self._vectors()
        self._ivf = build_ivf(self.dim, ids, vectors)
        self._trained_at = len(ids)
        if self.target_recall > 0:
            self.nprobe, self.tuned_recall = tune_nprobe(
                self._ivf, vectors, ids, self.target_recall
            )

    def _train_in_background(self) -> None:
        """``auto``: build the accelerator off the lock, then catch up and swap it in (the
        exact index took every write meanwhile and keeps them)."""
        try:
            with self._lock.read():
                ids, vectors = self._vectors()
                self._written = {}  # writes from now on, replayed on the new index
            index = build_ivf(self.dim, ids, vectors)
            nprobe, recall = tune_nprobe(index, vectors, ids, self.target_recall)
            with self._lock.write():
                written, self._written = self._written, None
                if written:  # drop every face written since, then add back the live ones
                    _remove_ids(index, np.fromiter(written, np.int64, len(written)))
                added = [(f, v) for f, v in written.items() if v is not None]
                if added:
                    index.add_with_ids(
                        np.stack([v for _, v in added]),
                        np.array([f for f, _ in added], dtype=np.int64),
                    )
                self._ivf = index
                self._trained_at = len(ids)
                self.nprobe, self.tuned_recall = nprobe, recall
                self._gpu_index = None
                self.switches += 1
        except Exception:  # noqa: BLE001 - the current index keeps serving
            log.exception("background training of a %s index failed", self.kind)
        finally:
            with self._lock.write():
                self._written = None
                self._trainer = None

    def describe(self) -> dict:
        """The index's current form: what it searches with, and (auto) whether it is
        switching."""
        ivf = self._ivf
        active = "ivf" if ivf is not None else self._kind.exact_form
        out: dict = {"kind": self.kind, "active": active}
        if ivf is not None:
            out.update(
                nlist=int(ivf.nlist),
                nprobe=min(self.nprobe, ivf.nlist),
                trained_at=self._trained_at,
                codes=accelerator_codes(self.dim)[0],
                rerank="exact",
            )
            if self.tuned_recall is not None:
                out.update(
                    target_recall=self.target_recall, tuned_recall=round(self.tuned_recall, 4)
                )
        if self._kind.background_training:
            out.update(switch_faces=self.switch_faces, training=self.training)
        return out

    @property
    def training(self) -> bool:
        """``auto``: a background (re)training is running."""
        return self._trainer is not None

    def wait_trained(self, timeout: float | None = None) -> None:
        """``auto``: wait for a running background training to be swapped in."""
        trainer = self._trainer
        if trainer is not None:
            trainer.join(timeout)

    def _rebuild_hnsw(self) -> None:
        """Rebuild the HNSW graph from its live vectors, dropping tombstones."""
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = _flat_vectors(hnsw_of(self._index).storage)
        keep = ~np.isin(ids, np.fromiter(self._tombstones, np.int64, len(self._tombstones)))
        index = self._kind.empty(self.dim)
        if keep.any():
            index.add_with_ids(vectors[keep], ids[keep])
        self._index = index
        self._tombstones.clear()

    def train(self) -> None:
        """ivf only: train (or re-train) the coarse quantiser now, whatever the gallery size."""
        if not self._kind.trainable:
            raise ValueError(f"a {self.kind} index needs no training")
        with self._lock.write():
            if self._subject_of:
                self._train_ivf()
                self._gpu_index = None

    # --- mutation ---------------------------------------------------------------
    def add(self, face_ids, subject_ids: list[str], vectors: np.ndarray) -> int:
        """Add faces (ids already present are skipped); return how many were added."""
        face_ids = np.asarray(face_ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(face_ids), self.dim)
        with self._lock.write():
            fresh = np.array([int(f) not in self._subject_of for f in face_ids], dtype=bool)
            if not fresh.any():
                return 0
            self._index.add_with_ids(vectors[fresh], face_ids[fresh])
            if self._ivf is not None:
                self._ivf.add_with_ids(vectors[fresh], face_ids[fresh])
            for face_id, subject_id, new in zip(face_ids.tolist(), subject_ids, fresh, strict=True):
                if new:
                    self._subject_of[face_id] = subject_id
                    self._faces_of.setdefault(subject_id, set()).add(face_id)
            if self._written is not None:
                for face_id, vector in zip(face_ids[fresh].tolist(), vectors[fresh], strict=True):
                    self._written[face_id] = vector
            growth = self._kind.growth(
                len(self._subject_of), self._trained_at, IVF_MIN_TRAIN, self.switch_faces
            )
            if growth == "train":
                self._train_ivf()
            elif growth == "background" and self._trainer is None:
                self._trainer = threading.Thread(
                    target=self._train_in_background, name="facegate-index-train", daemon=True
                )
                self._trainer.start()
            self._gpu_index = None
            return int(fresh.sum())

    def remove(self, face_ids) -> int:
        """Remove faces by id (unknown ids are ignored); return how many were removed."""
        with self._lock.write():
            return self._remove_locked([int(f) for f in face_ids])

    def remove_subject(self, subject_id: str) -> int:
        """Remove every face of a subject; return how many were removed."""
        with self._lock.write():
            return self._remove_locked(list(self._faces_of.get(subject_id, ())))

    def _remove_locked(self, face_ids: list[int]) -> int:
        present = [f for f in face_ids if f in self._subject_of]
        if not present:
            return 0
        for face_id in present:
            subject_id = self._subject_of.pop(face_id)
            faces = self._faces_of[subject_id]
            faces.discard(face_id)
            if not faces:
                del self._faces_of[subject_id]
        if self._written is not None:
            self._written.update(dict.fromkeys(present))
        if self._kind.tombstones:
            self._tombstones.update(present)
            if len(self._tombstones) > HNSW_REBUILD_FRACTION * self._index.ntotal:
                self._rebuild_hnsw()
        else:
            _remove_ids(self._index, np.array(present, dtype=np.int64))
            if self._ivf is not None:
                _remove_ids(self._ivf, np.array(present, dtype=np.int64))
        self._gpu_index = None
        return len(present)

    # --- queries ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._subject_of)

    @property
    def subjects(self) -> int:
        return len(self._faces_of)

    def face_ids(self) -> np.ndarray:
        """Sorted ids of the live faces."""
        with self._lock.read():
            return np.array(sorted(self._subject_of), dtype=np.int64)

    def contents(self) -> tuple[np.ndarray, dict[int, str]]:
        """What FAISS itself holds and what the mapping says, for checking the index: the ids
        of the live vectors read from FAISS's own id lists (tombstones left out, duplicates
        kept, in no particular order) and a copy of the face -> subject mapping.  With an
        accelerator, a face counts as held only when both indexes hold it; what only the
        accelerator holds, or holds twice, counts as extra."""
        with self._lock.read():
            held = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            if self._ivf is not None:
                fast = _ivf_ids(self._ivf)
                unique, counts = np.unique(fast, return_counts=True)
                held = np.concatenate(
                    [
                        held[np.isin(held, fast)],
                        fast[~np.isin(fast, held)],
                        np.repeat(unique[counts > 1], counts[counts > 1] - 1),
                    ]
                )
            if self._tombstones:
                tombstones = np.fromiter(self._tombstones, np.int64, len(self._tombstones))
                held = held[~np.isin(held, tombstones)]
            return held, dict(self._subject_of)

    def subject_of(self, face_id: int) -> str | None:
        return self._subject_of.get(int(face_id))

    def _raw_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search returning (scores, face ids): through the accelerator when there is
        one, else on the GPU mirror when there is one, else exact (or HNSW)."""
        if self._ivf is not None:
            return accelerated_search(
                self._ivf, queries, k, self.nprobe, self._index.reconstruct_batch
            )
        index = self._index
        if self.gpu and k <= GPU_MAX_K:
            with self._gpu_lock:
                gpu_index, row_ids = self._gpu_index, self._gpu_ids
                if gpu_index is None or row_ids is None:
                    if self._gpu_resources is None:
                        self._gpu_resources = faiss.StandardGpuResources()
                    # Mirror the flat storage; its row numbers map to ids through id_map.
                    gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index.index)
                    row_ids = faiss.vector_to_array(index.id_map)
                    self._gpu_index, self._gpu_ids = gpu_index, row_ids
            scores, rows = gpu_index.search(queries, k)
            return scores, np.where(rows >= 0, row_ids[np.maximum(rows, 0)], -1)
        return index.search(queries, k, params=self._kind.search_params(k, self.ef_search))

    def search(self, queries: np.ndarray, top_k: int) -> list[list[dict]]:
        """Per query, up to ``top_k`` subjects ``{subject_id, similarity, face_id}``, best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock.read():
            total = self._index.ntotal
            if total == 0 or top_k <= 0 or not self._subject_of:
                return [[] for _ in range(len(queries))]
            k = min(total, top_k * OVERFETCH + len(self._tombstones))
            while True:
                scores, ids = self._raw_search(queries, k)
                results = [self._fuse(s, i, top_k) for s, i in zip(scores, ids, strict=True)]
                if k >= total or all(len(r) >= top_k for r in results):
                    return results
                k = min(total, k * OVERFETCH)

    def _fuse(self, scores: np.ndarray, ids: np.ndarray, top_k: int) -> list[dict]:
        """Best face per subject, in score order (faiss returns faces best first)."""
        seen: set[str] = set()
        hits = []
        for score, face_id in zip(scores.tolist(), ids.tolist(), strict=True):
            subject_id = self._subject_of.get(face_id)
            if subject_id is None or subject_id in seen:
                continue  # -1 padding, tombstone, or a worse face of a listed subject
            seen.add(subject_id)
            hits.append(
                {"subject_id": subject_id, "similarity": float(score), "face_id": int(face_id)}
            )
            if len(hits) == top_k:
                break
        return hits

    def serialized_bytes(self) -> int:
        """Bytes of the FAISS index (and accelerator) as a snapshot stores them: about what
        they occupy in memory."""
        with self._lock.read():
            size = faiss.serialize_index(self._index).nbytes
            if self._ivf is not None:
                size += faiss.serialize_index(self._ivf).nbytes
            return int(size)

    # --- snapshots --------------------------------------------------------------
    def save(self, prefix: Path, seq: int, gallery: str) -> None:
        """Write ``<prefix>.faiss`` (the exact or HNSW index), ``<prefix>.ivf`` (the
        accelerator, if any) and their sidecar ``<prefix>.json`` (tagged with ``seq``).

        Each is written to a temporary name and renamed; the sidecar, which
        carries the index files' sha256, is renamed last and so marks a
        complete snapshot.
        """
        with self._lock.read():
            data = faiss.serialize_index(self._index).tobytes()
            accelerator = None if self._ivf is None else faiss.serialize_index(self._ivf).tobytes()
            fields = {
                "gallery": gallery,
                "seq": int(seq),
                "kind": self.kind,
                "dim": self.dim,
                "model_id": self.model_id,
                "count": len(self._subject_of),
                "ntotal": int(self._index.ntotal),
                "trained_at": self._trained_at,
                "nprobe": self.nprobe,
                "tuned_recall": self.tuned_recall,
                "face_ids": list(self._subject_of),
                "subject_ids": list(self._subject_of.values()),
                "tombstones": sorted(self._tombstones),
            }
        write_index_files(Path(prefix), data, accelerator, fields)

    @classmethod
    def load(
        cls,
        prefix: Path,
        kind: str,
        gpu: bool = False,
        nprobe: int = IVF_NPROBE,
        target_recall: float = 0.0,
        switch_faces: int = 0,
    ) -> tuple[GalleryIndex, dict]:
        """Read a snapshot; return (index, sidecar).  Raises :class:`SnapshotError`."""
        prefix = Path(prefix)
        sidecar, data, accelerator = read_index_files(prefix, kind)
        index = cls(
            sidecar["dim"], sidecar["model_id"], kind, gpu, nprobe, target_recall, switch_faces
        )
        restored = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if not isinstance(restored, faiss.IndexIDMap2):
            raise SnapshotError(f"snapshot {prefix} holds a {type(restored).__name__} index")
        index._index = restored
        if accelerator is not None:
            fast = faiss.deserialize_index(np.frombuffer(accelerator, dtype=np.uint8))
            if not isinstance(fast, faiss.IndexIVF) or fast.ntotal != restored.ntotal:
                raise SnapshotError(f"snapshot {prefix} holds an unusable ivf accelerator")
            index._ivf = fast
        index._trained_at = int(sidecar["trained_at"])
        if index.target_recall and sidecar.get("tuned_recall") is not None:
            index.nprobe, index.tuned_recall = int(sidecar["nprobe"]), sidecar["tuned_recall"]
        face_ids, subject_ids = sidecar["face_ids"], sidecar["subject_ids"]
        if (
            len(face_ids) != len(subject_ids)
            or len(face_ids) != sidecar["count"]
            or index._index.ntotal != len(face_ids) + len(sidecar["tombstones"])
        ):
            raise SnapshotError(f"snapshot {prefix} is inconsistent (counts differ)")
        for face_id, subject_id in zip(face_ids, subject_ids, strict=True):
            index._subject_of[int(face_id)] = subject_id
            index._faces_of.setdefault(subject_id, set()).add(int(face_id))
        index._tombstones = {int(f) for f in sidecar["tombstones"]}
        return index, sidecar
