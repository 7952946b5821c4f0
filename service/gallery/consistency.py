"""Whether one gallery's index holds exactly what the store holds
(``GalleryService.check_index``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.gallery.index import GalleryIndex


def compare_gallery(
    name: str,
    index: GalleryIndex | None,
    face_ids: Sequence[int] | np.ndarray,
    subject_ids: Sequence[str],
    examples: int = 5,
) -> dict:
    """Compare an index with the store's faces of the same gallery (``face_ids`` ascending,
    ``subject_ids`` theirs).

    Counts, with up to ``examples`` face ids of each:

    * ``missing``: stored faces FAISS does not hold (a search cannot find them);
    * ``extra``: vectors FAISS holds for no stored face (a duplicate vector counts too),
      and mapped face ids of neither FAISS nor the store;
    * ``wrong_subject``: faces in both whose subject in the index's mapping is not the
      store's (or is missing).
    """
    store_ids = np.asarray(face_ids, dtype=np.int64).reshape(-1)
    store_subject = dict(zip(store_ids.tolist(), subject_ids, strict=True))
    held: np.ndarray
    mapping: dict[int, str]
    if index is None:
        held, mapping = np.zeros(0, np.int64), {}
    else:
        held, mapping = index.contents()
    unique, counts = np.unique(held, return_counts=True)
    missing = np.setdiff1d(store_ids, unique, assume_unique=True).tolist()
    not_stored = np.setdiff1d(unique, store_ids, assume_unique=True).tolist()
    duplicated = unique[counts > 1].tolist()
    stale = sorted(set(mapping) - set(unique.tolist()) - set(store_subject))
    extra = len(not_stored) + int((counts - 1).sum()) + len(stale)
    wrong = [
        f
        for f in np.intersect1d(unique, store_ids, assume_unique=True).tolist()
        if mapping.get(f) != store_subject[f]
    ]
    return {
        "name": name,
        "consistent": not (missing or extra or wrong),
        "store_faces": len(store_ids),
        "index_faces": len(held),
        "missing": len(missing),
        "extra": extra,
        "wrong_subject": len(wrong),
        "examples": {
            "missing": missing[:examples],
            "extra": sorted(set(not_stored) | set(duplicated) | set(stale))[:examples],
            "wrong_subject": [
                {"face_id": f, "store": store_subject[f], "index": mapping.get(f)}
                for f in wrong[:examples]
            ],
        },
    }
