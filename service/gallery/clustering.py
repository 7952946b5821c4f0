"""Grouping faces into people: a k-NN graph with constrained average linkage.

The algorithm (:func:`cluster`), precision first:

1. **Graph.** Every face's ``neighbours`` nearest faces by cosine (FAISS, exact inner
   product on L2-normalised vectors); an edge is kept when its cosine reaches ``link``.
2. **Linkage.** Edges are visited from the most similar down; the groups of an edge's two
   faces are merged when the **mean cosine over every pair of faces across the two
   groups** reaches ``average`` (average linkage, computed exactly and cheaply from each
   group's sum of vectors: ``sum_a . sum_b / (|a| |b|)``), and when no constraint forbids
   it.  Passes repeat until one merges nothing.  Average linkage does not chain: one
   look-alike pair cannot join two people, since the rest of their faces pull the mean
   down (single linkage, DBSCAN's rule, joins them).
3. **Constraints.** Two faces of one photo are never in one group; two groups that each
   hold an existing cluster never merge (merging clusters is a person's decision); a face
   a person removed from a cluster never joins a group holding that cluster again.

Both thresholds come from the recognizer card's calibrated thresholds at named operating
points (see :func:`params_from_card`: the link threshold is corrected for the number of
faces each face is compared with), so they follow the model: no cosine is written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import faiss
import numpy as np

#: The k of the k-NN graph: each face proposes merges with at most this many others.
#: It bounds work (edges = faces x neighbours), not cluster size: groups grow through
#: their members' edges.
DEFAULT_NEIGHBOURS = 16
MAX_PASSES = 8
SEARCH_CHUNK = 4096


@dataclass(frozen=True)
class ClusterParams:
    """``link``: the least cosine of a graph edge; ``average``: the least mean cosine
    between two groups that merge; ``neighbours``: the k of the k-NN graph."""

    link: float
    average: float
    neighbours: int = DEFAULT_NEIGHBOURS
    link_point: str | None = None
    average_point: str | None = None

    def to_dict(self) -> dict:
        return {
            "link": round(self.link, 6),
            "link_point": self.link_point,
            "average": round(self.average, 6),
            "average_point": self.average_point,
            "neighbours": self.neighbours,
        }


def fmr_of(point: str) -> float:
    """``fmr_1e-3`` -> 0.001 (``ValueError`` for a name that is not a false-match rate)."""
    if not point.startswith("fmr_"):
        raise ValueError(f"{point!r} is not a false-match-rate operating point")
    return float(point[len("fmr_") :])


def impostor_tail(thresholds: dict[str, float]) -> tuple[float, float] | None:
    """(mean, std) of the Gaussian whose upper tail passes through the card's calibrated
    thresholds (least squares on ``threshold = mean + std * z(1 - fmr)``); None with fewer
    than two points.  The cards' points fit it closely (their z-spacing is even)."""
    points = [(NormalDist().inv_cdf(1.0 - fmr_of(p)), t) for p, t in thresholds.items()]
    if len(points) < 2:
        return None
    z = np.array([p[0] for p in points])
    t = np.array([p[1] for p in points])
    std, mean = np.polyfit(z, t, 1)
    return float(mean), float(std)


def params_from_card(
    thresholds: dict[str, float],
    link_point: str,
    average_point: str,
    neighbours: int,
    faces: int,
) -> ClusterParams:
    """Parameters from a recognizer card's calibrated thresholds (``fmr_1e-3`` -> cosine).

    ``average``: the card's threshold at ``average_point``.  ``link``: a face of a gallery
    of ``faces`` faces is compared with all the others, so a per-pair rate would let false
    links grow with the gallery; the link threshold is instead the cosine at which the
    chance that a face has **any** false link is the rate of ``link_point``: the per-pair
    rate ``fmr / faces``, read off the card's impostor tail (:func:`impostor_tail`) beyond
    its last calibrated point (never below the card's threshold at ``link_point``).
    ``KeyError`` names a point the card lacks.
    """
    for point in (link_point, average_point):
        if point not in thresholds:
            raise KeyError(
                f"the recognizer card has no threshold at {point!r} "
                f"(it has {', '.join(sorted(thresholds)) or 'none'})"
            )
    link = float(thresholds[link_point])
    tail = impostor_tail(thresholds)
    if tail is not None and faces > 1:
        mean, std = tail
        per_pair = fmr_of(link_point) / faces
        link = max(link, mean + std * NormalDist().inv_cdf(1.0 - per_pair))
    return ClusterParams(
        link=min(link, 1.0),
        average=float(thresholds[average_point]),
        neighbours=int(neighbours),
        link_point=link_point,
        average_point=average_point,
    )


def knn_edges(embeddings: np.ndarray, neighbours: int, link: float) -> np.ndarray:
    """``(m, 3)`` rows ``(i, j, cosine)`` with ``i < j``, each pair once, cosine >= ``link``,
    from every face's ``neighbours`` nearest faces; most similar first."""
    n = len(embeddings)
    if n < 2:
        return np.zeros((0, 3), np.float64)
    k = min(neighbours + 1, n)
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    rows, cols, sims = [], [], []
    for lo in range(0, n, SEARCH_CHUNK):
        scores, ids = index.search(embeddings[lo : lo + SEARCH_CHUNK], k)
        q = np.repeat(np.arange(lo, lo + len(ids)), k)
        keep = (ids.ravel() >= 0) & (scores.ravel() >= link) & (ids.ravel() != q)
        rows.append(q[keep])
        cols.append(ids.ravel()[keep])
        sims.append(scores.ravel()[keep])
    i = np.concatenate(rows)
    j = np.concatenate(cols)
    s = np.concatenate(sims).astype(np.float64)
    lo_, hi_ = np.minimum(i, j), np.maximum(i, j)
    key = lo_.astype(np.int64) * n + hi_
    _, first = np.unique(key, return_index=True)
    edges = np.stack([lo_[first], hi_[first], s[first]], axis=1)
    return edges[np.argsort(-edges[:, 2], kind="stable")]


def cluster(
    embeddings: np.ndarray,
    photos: np.ndarray,
    params: ClusterParams,
    fixed: np.ndarray | None = None,
    forbidden: list[set[int]] | None = None,
) -> np.ndarray:
    """A group label per face (``-1``: a face left alone, an outlier).

    ``photos``: per face an integer naming its photo (faces of one photo never share a
    group).  ``fixed``: per face the existing cluster it is in (``-1``: none); faces of one
    existing cluster start as one group, and two groups holding existing clusters never
    merge.  ``forbidden``: per face the existing clusters it must never be grouped with.
    Groups are labelled ``0..``; a group holding existing cluster ``c`` is labelled with
    the smallest face index of that group like any other: map it back through ``fixed``.
    """
    n = len(embeddings)
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    fixed = np.full(n, -1, np.int64) if fixed is None else np.asarray(fixed, np.int64)
    parent = np.arange(n)
    sums = vectors.astype(np.float64).copy()
    size = np.ones(n, np.int64)
    photo_sets: list[set[int]] = [{int(p)} for p in photos]
    holds: list[int] = [int(c) for c in fixed]  # the existing cluster a group holds, or -1
    bans: list[set[int]] = [set(f) for f in forbidden] if forbidden else [set() for _ in range(n)]

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(a: int, b: int) -> None:
        if size[a] < size[b]:
            a, b = b, a
        parent[b] = a
        sums[a] += sums[b]
        size[a] += size[b]
        if len(photo_sets[a]) < len(photo_sets[b]):
            photo_sets[a], photo_sets[b] = photo_sets[b], photo_sets[a]
        photo_sets[a] |= photo_sets[b]
        photo_sets[b] = set()
        if holds[a] < 0:
            holds[a] = holds[b]
        bans[a] |= bans[b]
        bans[b] = set()

    # faces of one existing cluster start as one group
    firsts: dict[int, int] = {}
    for face in range(n):
        c = int(fixed[face])
        if c < 0:
            continue
        if c in firsts:
            a, b = find(firsts[c]), find(face)
            if a != b:
                union(a, b)
        else:
            firsts[c] = face

    edges = knn_edges(vectors, params.neighbours, params.link)
    pairs = edges[:, :2].astype(np.int64)
    for _ in range(MAX_PASSES):
        merged = 0
        for i, j in pairs:
            a, b = find(int(i)), find(int(j))
            if a == b:
                continue
            ha, hb = holds[a], holds[b]
            if ha >= 0 and hb >= 0:
                continue
            if (ha >= 0 and ha in bans[b]) or (hb >= 0 and hb in bans[a]):
                continue
            small, large = (
                (photo_sets[a], photo_sets[b])
                if len(photo_sets[a]) < len(photo_sets[b])
                else (photo_sets[b], photo_sets[a])
            )
            if any(p in large for p in small):
                continue
            mean = float(sums[a] @ sums[b]) / float(size[a] * size[b])
            if mean < params.average:
                continue
            union(a, b)
            merged += 1
        if not merged:
            break
    roots = np.fromiter((find(x) for x in range(n)), dtype=np.int64, count=n)
    counts = np.bincount(roots, minlength=n)
    labels = np.where(counts[roots] > 1, roots, -1)
    # a lone face of an existing cluster stays in it
    labels = np.where((labels < 0) & (fixed >= 0), roots, labels)
    return labels
