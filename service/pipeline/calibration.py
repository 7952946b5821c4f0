"""Threshold calibration at named false-match rates: the one implementation of the protocol.

Both ``facegate eval-pairs`` (its thresholds) and ``facegate models calibrate`` go through
:func:`tally` and :func:`operating_points`; the rule that turns impostor scores into a
threshold is :func:`threshold_at` (also behind :func:`service.pipeline.pairs.fmr_threshold`).

**Pairs.** Photos carry a person label. Genuine pairs are every pair of photos of one person
(or a given list, as a ``pairs.txt`` names them); impostor pairs are every pair of photos of
two different persons: ``(n^2 - sum n_p^2) / 2`` of them for ``n`` photos, ``n_p`` per person.

**Scores in blocks.** Embeddings are L2-normalised, so a block of rows times all later rows
(``E[i:j] @ E[i:].T``) gives the cosines of a block of the upper triangle; blocks hold at most
``BLOCK_ENTRIES`` scores, so memory stays bounded whatever the number of photos.

**Exact thresholds without keeping every score.** The threshold at FMR ``f`` is the smallest
score ``t`` such that at most ``floor(f * N)`` of the ``N`` impostor scores reach it
(:func:`threshold_at`): it only depends on the ``floor(f * N) + 1`` highest impostor scores.
:func:`tally` therefore keeps a running top-``K`` of the impostor scores with their photo
indices (a buffer that is cut back to the ``K`` highest with ``np.argpartition`` whenever it
doubles, only scores at or above the current ``K``-th best ever entering it), where
``K = TAIL_MARGIN * f_max * N + 1`` (``f_max``, the largest FMR asked for: 1e-2; at least
``TAIL_MIN``, or all of them). The top
``K`` is exact, so every threshold is exactly the one a sort of all ``N`` scores would give,
with memory ``O(f_max * N)`` instead of ``O(N)`` (about 3 % of the pairs). The margin is
there for the bootstrap, whose replicates need a little more than ``f_max * N`` of the tail.
The whole impostor distribution is also counted in ``HISTOGRAM_BINS`` fine bins over
``[-1, 1]`` (for histograms and the DET curve, not for thresholds).

**Rule of 30** (Doddington et al., 2000): an FMR ``f`` is reported only when at least
``30 / f`` impostor pairs exist, i.e. at least 30 false matches are expected at that
threshold; otherwise :func:`photos_needed` says how many photos, at the same number of
photos per person, would give enough pairs.

**Confidence intervals by a bootstrap over persons** (Bolle et al., "subsets bootstrap"):
pairs of one person are not independent, so each replicate draws ``P`` persons with
replacement (person ``p`` drawn ``w_p`` times). A genuine pair of ``p`` then weighs ``w_p``,
an impostor pair of ``p`` and ``q`` weighs ``w_p * w_q``, and the replicate's impostor total
is ``((sum w_p n_p)^2 - sum (w_p n_p)^2) / 2``. Each replicate gives the threshold at FMR ``f``
(weighted, the same rule), the FNMR at that threshold, and the FMR that the point estimate's
threshold has under the replicate's persons; the 95 % interval is the 2.5 and 97.5
percentiles. A replicate whose threshold falls below the kept tail (rare; counted as
``truncated``) takes the lowest kept score, so its threshold is an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

#: Operating points ``facegate models calibrate`` reports (name -> false-match rate).
CALIBRATION_POINTS: dict[str, float] = {
    "fmr_1e-2": 1e-2,
    "fmr_1e-3": 1e-3,
    "fmr_1e-4": 1e-4,
    "fmr_1e-5": 1e-5,
    "fmr_1e-6": 1e-6,
}
#: Doddington's rule: at least this many expected false matches at a reported FMR.
RULE_OF = 30
#: Most scores one block of the pair matrix holds (float32: 16 MB).
BLOCK_ENTRIES = 1 << 22
#: Kept impostor tail, as a multiple of ``f_max * N`` ...
TAIL_MARGIN = 3.0
#: ... and at least this many scores (all of them on a small set: no truncated replicate).
TAIL_MIN = 100_000
#: Bins of the impostor score histogram over [-1, 1].
HISTOGRAM_BINS = 4000
#: Bootstrap replicates by default.
REPLICATES = 1000


def allowed_false_matches(n_impostors: int, fmr: float) -> int:
    """``floor(fmr * n)``, with ``fmr`` read as the decimal it is written as (0.29 of 100
    allows 29, not the 28 of 0.29 × 100 in binary floating point)."""
    return math.floor(Fraction(repr(float(fmr))) * int(n_impostors))


def threshold_at(descending: np.ndarray, n_impostors: int, fmr: float) -> float:
    """Smallest threshold that at most ``floor(fmr * n)`` of ``n`` impostor scores reach, from
    the highest scores in descending order (at least ``floor(fmr * n) + 1`` of them, unless
    that is all of them); −inf when ``fmr`` allows every impostor."""
    allowed = allowed_false_matches(n_impostors, fmr)
    if allowed >= n_impostors:
        return -math.inf
    if allowed >= len(descending):
        raise ValueError(
            f"the {len(descending)} highest impostor scores kept cannot place FMR {fmr:g} "
            f"of {n_impostors} (needs {allowed + 1})"
        )
    return float(np.nextafter(np.float64(descending[allowed]), np.inf))


def supported(n_impostors: int, fmr: float) -> bool:
    """Rule of 30: ``n * fmr >= 30``."""
    return Fraction(repr(float(fmr))) * int(n_impostors) >= RULE_OF


def impostor_pair_count(photos_per_person: Sequence[int] | np.ndarray) -> int:
    counts = np.asarray(photos_per_person, dtype=np.int64)
    total = int(counts.sum())
    return (total * total - int((counts * counts).sum())) // 2


def photos_needed(photos_per_person: Sequence[int] | np.ndarray, fmr: float) -> dict[str, int]:
    """Photos (and persons, at the same photos per person) whose impostor pairs satisfy the
    rule of 30 at ``fmr``: the least ``n`` with ``(n^2 - n * m) / 2 >= 30 / fmr``, where
    ``m = sum n_p^2 / n`` (the pairs a photo has with its own person's photos)."""
    counts = np.asarray(photos_per_person, dtype=np.float64)
    n = counts.sum()
    m = float((counts * counts).sum() / n) if n else 1.0
    need = float(Fraction(RULE_OF) / Fraction(repr(float(fmr))))
    photos = math.ceil((m + math.sqrt(m * m + 8 * need)) / 2)
    while (photos * photos - photos * m) / 2 < need:
        photos += 1
    per_person = float(counts.mean()) if len(counts) else 1.0
    return {"photos": photos, "persons": math.ceil(photos / per_person)}


@dataclass(frozen=True)
class Scores:
    """What :func:`tally` keeps of the pair scores (photo indices into the tallied set)."""

    #: Person index of each photo.
    photo_person: np.ndarray
    #: Number of persons (person indices are ``0 .. persons - 1``).
    persons: int
    #: Genuine scores (float64) and their photo pairs (G, 2).
    genuine: np.ndarray
    genuine_pairs: np.ndarray
    #: Number of impostor pairs.
    impostors: int
    #: The highest impostor scores, descending (float64), and their photo pairs (K, 2).
    tail: np.ndarray
    tail_pairs: np.ndarray
    #: Impostor counts in ``HISTOGRAM_BINS`` equal bins over [-1, 1].
    histogram: np.ndarray

    @property
    def photos_per_person(self) -> np.ndarray:
        return np.bincount(self.photo_person, minlength=self.persons)

    def fmr_at(self, threshold: float) -> float:
        """Measured FMR of ``threshold`` (it must lie within the kept tail)."""
        if self.impostors == 0:
            return float("nan")
        reached = int(np.count_nonzero(self.tail >= threshold))
        return reached / self.impostors

    def fnmr_at(self, threshold: float) -> float:
        if self.genuine.size == 0:
            return float("nan")
        return float(np.mean(self.genuine < threshold))


def _person_codes(persons: Sequence[str] | np.ndarray) -> tuple[np.ndarray, int]:
    _, codes = np.unique(np.asarray(persons), return_inverse=True)
    codes = codes.astype(np.int64).ravel()
    return codes, int(codes.max()) + 1 if codes.size else 0


def tally(
    embeddings: np.ndarray,
    persons: Sequence[str] | np.ndarray,
    genuine_pairs: np.ndarray | None = None,
    max_fmr: float = max(CALIBRATION_POINTS.values()),
    *,
    block_entries: int = BLOCK_ENTRIES,
) -> Scores:
    """Score every impostor pair in bounded blocks, keep the exact top tail (module docstring).

    ``embeddings`` (n, d) are L2-normalised; ``persons`` labels each row. Genuine pairs are all
    same-person pairs, or ``genuine_pairs`` ((G, 2) row indices) when given.
    """
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(emb)
    codes, n_persons = _person_codes(persons)
    if len(codes) != n:
        raise ValueError(f"{n} embeddings but {len(codes)} person labels")
    total = impostor_pair_count(np.bincount(codes, minlength=n_persons))
    keep = min(total, math.ceil(TAIL_MARGIN * max_fmr * total) + 1)
    keep = max(keep, min(total, TAIL_MIN))
    histogram = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    tail_scores: list[np.ndarray] = []
    tail_rows: list[np.ndarray] = []
    tail_cols: list[np.ndarray] = []
    buffered = 0
    cut = -np.inf
    gen_scores: list[np.ndarray] = []
    gen_pairs: list[np.ndarray] = []
    rows_per_block = max(1, min(n, block_entries // max(1, n)))
    for start in range(0, n, rows_per_block):
        stop = min(n, start + rows_per_block)
        block = emb[start:stop] @ emb[start:].T  # rows start..stop, columns start..n
        rows = np.arange(start, stop)[:, None]
        cols = np.arange(start, n)[None, :]
        upper = cols > rows
        same = codes[start:stop, None] == codes[None, start:]
        impostor = upper & ~same
        values = block[impostor]
        if values.size:
            values += np.float32(1.0)
            values *= np.float32(HISTOGRAM_BINS / 2)
            bins = values.astype(np.int32)
            del values
            np.clip(bins, 0, HISTOGRAM_BINS - 1, out=bins)
            histogram += np.bincount(bins, minlength=HISTOGRAM_BINS)
            del bins
        candidates = impostor & (block >= cut)
        found = int(np.count_nonzero(candidates))
        if found > keep:  # only this block's ``keep`` highest can still be in the top
            kth = np.partition(block[candidates], found - keep)[found - keep]
            candidates &= block >= kth
        r, c = np.nonzero(candidates)
        if r.size:  # float32 scores, int32 photo indices: the tail's memory is 12 B a pair
            tail_scores.append(block[r, c])
            tail_rows.append((r + start).astype(np.int32))
            tail_cols.append((c + start).astype(np.int32))
            buffered += r.size
        if buffered > 2 * keep:
            scores_all = np.concatenate(tail_scores)
            top = np.argpartition(-scores_all, keep - 1)[:keep]
            tail_scores = [scores_all[top]]
            tail_rows = [np.concatenate(tail_rows)[top]]
            tail_cols = [np.concatenate(tail_cols)[top]]
            buffered = keep
            cut = float(tail_scores[0].min())
        if genuine_pairs is None:
            gr, gc = np.nonzero(upper & same)
            if gr.size:
                gen_scores.append(block[gr, gc].astype(np.float64))
                gen_pairs.append(np.stack([gr + start, gc + start], axis=1))
    scores = np.concatenate(tail_scores).astype(np.float64) if tail_scores else np.zeros(0)
    order = np.argsort(-scores, kind="stable")[:keep]
    pairs_tail = (
        np.stack([np.concatenate(tail_rows), np.concatenate(tail_cols)], axis=1)[order]
        if tail_scores
        else np.zeros((0, 2), np.int32)
    )
    if genuine_pairs is not None:
        gp = np.asarray(genuine_pairs, dtype=np.int64).reshape(-1, 2)
        genuine = np.einsum("ij,ij->i", emb[gp[:, 0]], emb[gp[:, 1]]).astype(np.float64)
    else:
        gp = np.concatenate(gen_pairs) if gen_pairs else np.zeros((0, 2), np.int64)
        genuine = np.concatenate(gen_scores) if gen_scores else np.zeros(0)
    return Scores(
        photo_person=codes,
        persons=n_persons,
        genuine=genuine,
        genuine_pairs=gp,
        impostors=total,
        tail=scores[order],
        tail_pairs=pairs_tail,
        histogram=histogram,
    )


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"low": float(f"{self.low:.6g}"), "high": float(f"{self.high:.6g}")}


@dataclass(frozen=True)
class OperatingPoint:
    """One FMR target: the threshold, what it measures, and (bootstrap) 95 % intervals."""

    name: str
    target: float
    threshold: float
    fmr: float
    fnmr: float
    false_matches: int
    threshold_ci: Interval | None = None
    fnmr_ci: Interval | None = None
    fmr_ci: Interval | None = None

    def to_dict(self) -> dict:
        out: dict = {
            "target": self.target,
            "threshold": round(self.threshold, 6),
            "fmr": self.fmr,
            "fnmr": round(self.fnmr, 6),
            "false_matches": self.false_matches,
        }
        for key in ("threshold_ci", "fnmr_ci", "fmr_ci"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.to_dict()
        return out


@dataclass(frozen=True)
class Unsupported:
    """An FMR target the impostor pairs cannot support (rule of 30)."""

    name: str
    target: float
    impostors_needed: int
    photos_needed: int
    persons_needed: int

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "impostors_needed": self.impostors_needed,
            "photos_needed": self.photos_needed,
            "persons_needed": self.persons_needed,
        }


@dataclass(frozen=True)
class Bootstrap:
    replicates: int
    seed: int
    truncated: int


@dataclass(frozen=True)
class OperatingPoints:
    points: tuple[OperatingPoint, ...]
    unsupported: tuple[Unsupported, ...]
    bootstrap: Bootstrap | None

    def thresholds(self) -> dict[str, float]:
        return {p.name: round(p.threshold, 6) for p in self.points}


def operating_points(
    scores: Scores,
    targets: dict[str, float] | None = None,
    *,
    replicates: int = REPLICATES,
    seed: int = 0,
    rule_of_30: bool = True,
) -> OperatingPoints:
    """The threshold, measured FMR and FNMR at each target (only the supported ones under
    the rule of 30), with bootstrap-over-persons 95 % intervals (``replicates`` 0: none)."""
    targets = CALIBRATION_POINTS if targets is None else targets
    counts = scores.photos_per_person
    points, unsupported = [], []
    for name, fmr in targets.items():
        if scores.impostors == 0 or (rule_of_30 and not supported(scores.impostors, fmr)):
            need = photos_needed(counts, fmr)
            unsupported.append(
                Unsupported(
                    name,
                    fmr,
                    math.ceil(Fraction(RULE_OF) / Fraction(repr(float(fmr)))),
                    need["photos"],
                    need["persons"],
                )
            )
            continue
        threshold = threshold_at(scores.tail, scores.impostors, fmr)
        reached = int(np.count_nonzero(scores.tail >= threshold))
        points.append(
            OperatingPoint(
                name, fmr, threshold, reached / scores.impostors, scores.fnmr_at(threshold), reached
            )
        )
    boot = None
    if replicates > 0 and points and scores.persons > 1:
        points, boot = _bootstrap(scores, points, replicates, seed)
    return OperatingPoints(tuple(points), tuple(unsupported), boot)


def _bootstrap(
    scores: Scores, points: list[OperatingPoint], replicates: int, seed: int
) -> tuple[list[OperatingPoint], Bootstrap]:
    rng = np.random.default_rng(seed)
    n_persons = scores.persons
    counts = scores.photos_per_person.astype(np.float64)
    draws = rng.multinomial(n_persons, np.full(n_persons, 1.0 / n_persons), size=replicates)
    person = scores.photo_person
    tail_a = person[scores.tail_pairs[:, 0]]
    tail_b = person[scores.tail_pairs[:, 1]]
    gen_person = person[scores.genuine_pairs[:, 0]] if scores.genuine.size else np.zeros(0, int)
    fixed_reach = [int(np.count_nonzero(scores.tail >= p.threshold)) for p in points]
    thresholds = np.empty((replicates, len(points)))
    fnmrs = np.full((replicates, len(points)), np.nan)
    fmrs = np.empty((replicates, len(points)))
    truncated = 0
    for b in range(replicates):
        w = draws[b].astype(np.float64)
        weighted = w * counts
        total = (weighted.sum() ** 2 - (weighted * weighted).sum()) / 2
        cumulative = np.cumsum(w[tail_a] * w[tail_b])
        gen_w = w[gen_person]
        gen_total = gen_w.sum()
        for k, point in enumerate(points):
            allowed = float(Fraction(repr(point.target)) * Fraction(total))
            j = int(np.searchsorted(cumulative, allowed, side="right"))
            if j >= len(cumulative):
                truncated += 1
                t = float(scores.tail[-1])
            else:
                t = float(np.nextafter(scores.tail[j], np.inf))
            thresholds[b, k] = t
            if gen_total > 0:
                fnmrs[b, k] = float(gen_w[scores.genuine < t].sum() / gen_total)
            reach = fixed_reach[k]
            fmrs[b, k] = (cumulative[reach - 1] if reach else 0.0) / total if total else np.nan

    def interval(values: np.ndarray) -> Interval | None:
        values = values[np.isfinite(values)]
        if not values.size:
            return None
        low, high = np.percentile(values, [2.5, 97.5])
        return Interval(float(low), float(high))

    out = [
        OperatingPoint(
            p.name,
            p.target,
            p.threshold,
            p.fmr,
            p.fnmr,
            p.false_matches,
            interval(thresholds[:, k]),
            interval(fnmrs[:, k]),
            interval(fmrs[:, k]),
        )
        for k, p in enumerate(points)
    ]
    return out, Bootstrap(replicates, seed, truncated)


def det_curve(scores: Scores, max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """(FMR, FNMR) along decreasing thresholds: the exact tail where it is kept (every
    rank down to one false match), the histogram's bin edges below it."""
    n = scores.impostors
    genuine = np.sort(scores.genuine)
    if n == 0 or genuine.size == 0:
        return np.zeros(0), np.zeros(0)
    ranks = np.unique(np.geomspace(1, len(scores.tail), num=max_points).astype(np.int64)) - 1
    t_tail = scores.tail[ranks]
    fmr_tail = (ranks + 1) / n
    edges = np.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1)[:-1]
    above = np.cumsum(scores.histogram[::-1])[::-1]  # impostors in bins >= edge
    low = edges < (t_tail[-1] if t_tail.size else 1.0)
    t_all = np.concatenate([t_tail, edges[low][::-1]])
    fmr_all = np.concatenate([fmr_tail, above[low][::-1] / n])
    fnmr_all = np.searchsorted(genuine, t_all, side="left") / genuine.size
    return fmr_all, fnmr_all
