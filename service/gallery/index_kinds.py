"""One strategy object per index kind (``settings.index_type``), chosen once when a
:class:`~service.gallery.index.GalleryIndex` is built: what FAISS index holds the exact
vectors, whether they may be mirrored on a GPU, what growth triggers (re-)training, how
faces are removed and which search parameters a search takes.  The state (the FAISS
indexes, the face -> subject mapping, the background trainer) stays in ``GalleryIndex``;
the kinds hold none, so one instance of each serves every gallery.
"""

from __future__ import annotations

from typing import Literal, Protocol, TypeAlias

import faiss

from service.config import INDEX_TYPES, IndexType

IVF_RETRAIN_GROWTH = 8
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80

#: what a gallery's growth asks of its index: nothing, training now (under the write
#: lock), or training in a background thread
Growth: TypeAlias = Literal["none", "train", "background"]


def hnsw_of(index: faiss.IndexIDMap2) -> faiss.IndexHNSW:
    """The HNSW index inside an ``hnsw`` gallery's id map."""
    hnsw = faiss.downcast_index(index.index)
    assert isinstance(hnsw, faiss.IndexHNSW)
    return hnsw


def _id_map(dim: int, inner: str) -> faiss.IndexIDMap2:
    index = faiss.index_factory(dim, f"IDMap2,{inner}", faiss.METRIC_INNER_PRODUCT)
    assert isinstance(index, faiss.IndexIDMap2)  # faiss returns the index downcast
    return index


class IndexKind(Protocol):
    """How one kind of index is built, grows, forgets and is searched."""

    #: the ``index_type`` this strategy implements
    name: IndexType
    #: the exact vectors may be mirrored on a GPU for search
    gpu_mirror: bool
    #: the ivf probe count is always tuned for a target recall (else only with nprobe 0)
    always_tuned: bool
    #: ``GalleryIndex.train`` may be called to train it now
    trainable: bool
    #: removed faces stay in the graph as tombstones (no native removal)
    tombstones: bool
    #: what searches when there is no accelerator (``describe``'s ``active``)
    exact_form: Literal["flat", "hnsw"]
    #: trains in a background thread once grown (``describe`` says whether it is)
    background_training: bool

    def empty(self, dim: int) -> faiss.IndexIDMap2:
        """An empty index of ``dim``-d vectors with ids."""
        ...

    def growth(self, size: int, trained_at: int, min_train: int, switch_faces: int) -> Growth:
        """What a gallery of ``size`` faces, last trained at ``trained_at`` (0: never),
        asks for; ``min_train`` (ivf) and ``switch_faces`` (auto): the size of the first
        training."""
        ...

    def search_params(self, k: int, ef_search: int) -> faiss.SearchParameters | None:
        """Parameters of a search of the exact (or HNSW) index for ``k`` faces."""
        ...


class ExactIndex:
    """``flat``: an id map over ``IndexFlatIP``, exact search, never trained."""

    name: IndexType = "flat"
    gpu_mirror = True
    always_tuned = False
    trainable = False
    tombstones = False
    exact_form: Literal["flat", "hnsw"] = "flat"
    background_training = False

    def empty(self, dim: int) -> faiss.IndexIDMap2:
        return _id_map(dim, "Flat")

    def growth(self, size: int, trained_at: int, min_train: int, switch_faces: int) -> Growth:
        return "none"

    def search_params(self, k: int, ef_search: int) -> faiss.SearchParameters | None:
        return None


class IvfIndex(ExactIndex):
    """``ivf``: the exact index plus an inverted-file accelerator, trained (in the
    caller's thread) at ``min_train`` faces and whenever the gallery has grown
    ``IVF_RETRAIN_GROWTH``-fold since."""

    name: IndexType = "ivf"
    gpu_mirror = False
    trainable = True

    def growth(self, size: int, trained_at: int, min_train: int, switch_faces: int) -> Growth:
        if size >= max(min_train, IVF_RETRAIN_GROWTH * trained_at):
            return "train"
        return "none"


class AutoIndex(ExactIndex):
    """``auto``: exact until ``switch_faces``, then the ivf accelerator (always tuned),
    trained and re-trained in a background thread."""

    name: IndexType = "auto"
    always_tuned = True
    background_training = True

    def growth(self, size: int, trained_at: int, min_train: int, switch_faces: int) -> Growth:
        if size >= max(switch_faces, IVF_RETRAIN_GROWTH * trained_at):
            return "background"
        return "none"


class HnswIndex:
    """``hnsw``: an id map over ``IndexHNSWFlat``; removed faces become tombstones."""

    name: IndexType = "hnsw"
    gpu_mirror = False
    always_tuned = False
    trainable = False
    tombstones = True
    exact_form: Literal["flat", "hnsw"] = "hnsw"
    background_training = False

    def empty(self, dim: int) -> faiss.IndexIDMap2:
        index = _id_map(dim, f"HNSW{HNSW_M},Flat")
        hnsw_of(index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index

    def growth(self, size: int, trained_at: int, min_train: int, switch_faces: int) -> Growth:
        return "none"

    def search_params(self, k: int, ef_search: int) -> faiss.SearchParameters | None:
        # SearchParametersHNSW is missing from faiss's type stub (it is in the module)
        return faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
            efSearch=max(ef_search, k)
        )


KINDS: dict[str, IndexKind] = {
    kind.name: kind for kind in (ExactIndex(), IvfIndex(), HnswIndex(), AutoIndex())
}
assert tuple(sorted(KINDS)) == tuple(sorted(INDEX_TYPES))


def index_kind(name: str) -> IndexKind:
    """The strategy of index type ``name``; ``ValueError`` for an unknown one."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown index type {name!r}; expected one of {INDEX_TYPES}") from None
