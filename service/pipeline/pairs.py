"""Pair-verification protocol (LFW ``pairs.txt``): parsing, 10-fold accuracy, FMR thresholds.

``pairs.txt`` starts with ``"<folds> <pairs per class>"`` and then, fold after
fold, that many same-identity lines (``name i j``) followed by as many
different-identity lines (``name1 i name2 j``). Accuracy follows the standard
protocol: for each fold, the threshold that maximises accuracy on the other
folds is applied to it; the report is the mean and (population) standard
deviation over folds. Operating thresholds at a false-match rate are read off the
impostor score distribution: the lowest threshold that keeps the measured FMR at or
below the target, so the true-match rate there is the largest any threshold reaches
at that FMR (TAR at FAR read as ``FAR <= target``, as IJB-C-style benchmarks report it).
Every operating point the project reports (card thresholds, ``facegate eval-pairs``,
the training package's TAR@FAR) comes from :func:`operating_point`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibration import threshold_at

#: Side of the no-face fallback square, as a fraction of the image's shorter side.
NO_FACE_FRACTION = 0.56

#: Operating points calibrated by ``fmr_thresholds``.
FMR_POINTS = {"fmr_1e-2": 1e-2, "fmr_1e-3": 1e-3, "fmr_1e-4": 1e-4}


@dataclass(frozen=True)
class Pair:
    a: str  # image key "Name/Name_0001.jpg"
    b: str
    same: bool
    fold: int


def image_key(name: str, number: str | int) -> str:
    return f"{name}/{name}_{int(number):04d}.jpg"


def parse_pairs(path: Path | str) -> list[Pair]:
    """All pairs of a ``pairs.txt`` file, with their fold index."""
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or len(lines[0]) != 2:
        raise ValueError(f"{path}: first line must be '<folds> <pairs per class>'")
    folds, per_class = int(lines[0][0]), int(lines[0][1])
    body = lines[1:]
    if len(body) != folds * 2 * per_class:
        raise ValueError(f"{path}: expected {folds * 2 * per_class} pairs, found {len(body)}")
    pairs = []
    for i, fields in enumerate(body):
        fold = i // (2 * per_class)
        if len(fields) == 3:
            pairs.append(
                Pair(image_key(fields[0], fields[1]), image_key(fields[0], fields[2]), True, fold)
            )
        elif len(fields) == 4:
            pairs.append(
                Pair(image_key(fields[0], fields[1]), image_key(fields[2], fields[3]), False, fold)
            )
        else:
            raise ValueError(f"{path}: line {i + 2} is not a pair: {' '.join(fields)}")
    return pairs


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold (score >= t means same) maximising accuracy; midpoint between scores."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.int64)
    # Candidate cut k: predict "same" for s[k:]; correct = negatives below + positives above.
    neg_below = np.concatenate([[0], np.cumsum(1 - y)])
    pos_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    correct = neg_below + pos_above
    k = int(np.argmax(correct))
    if k == 0:
        return float(s[0]) - 1e-6
    if k == len(s):
        return float(s[-1]) + 1e-6
    return float((s[k - 1] + s[k]) / 2)


def kfold_accuracy(
    scores: np.ndarray, labels: np.ndarray, folds: np.ndarray
) -> tuple[float, float, list[float], list[float]]:
    """(mean, std, per-fold accuracies, per-fold thresholds) of the k-fold protocol."""
    scores, labels, folds = np.asarray(scores), np.asarray(labels, bool), np.asarray(folds)
    accuracies, thresholds = [], []
    for fold in np.unique(folds):
        test = folds == fold
        threshold = best_threshold(scores[~test], labels[~test])
        accuracies.append(float(np.mean((scores[test] >= threshold) == labels[test])))
        thresholds.append(threshold)
    return float(np.mean(accuracies)), float(np.std(accuracies)), accuracies, thresholds


def fmr_threshold(impostor_scores: np.ndarray, fmr: float) -> float:
    """Smallest threshold at which at most ``fmr`` of the impostor scores reach it.

    Resolution is limited by the number of impostor scores (1/n).  ``fmr`` is read as the
    decimal it is written as (0.29 of 100 impostors allows 29, not the 28 of 0.29 × 100 in
    binary floating point); when it allows every impostor the threshold is −inf.
    """
    scores = np.sort(np.asarray(impostor_scores, dtype=np.float64))[::-1]
    return threshold_at(scores, len(scores), fmr)


def operating_point(
    impostor_scores: np.ndarray, genuine_scores: np.ndarray, fmr: float
) -> dict[str, float]:
    """Threshold, measured FMR and TMR at the target false-match rate ``fmr``.

    The threshold is :func:`fmr_threshold`'s, the lowest with a measured FMR <= ``fmr``; lowering
    a threshold never lowers the TMR, so this is the largest TMR at an FMR within the target.
    Tied scores pass or fail together, so the measured FMR can be below the target.
    """
    impostor = np.asarray(impostor_scores, dtype=np.float64)
    genuine = np.asarray(genuine_scores, dtype=np.float64)
    if impostor.size == 0:
        raise ValueError("an operating point needs at least one impostor score")
    threshold = fmr_threshold(impostor, fmr)
    return {
        "threshold": threshold,
        "fmr": float(np.mean(impostor >= threshold)),
        "tmr": float(np.mean(genuine >= threshold)) if genuine.size else float("nan"),
    }


def fmr_thresholds(
    impostor_scores: np.ndarray, genuine_scores: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """For each operating point: threshold, measured FMR and (given genuine scores) TMR."""
    impostor = np.asarray(impostor_scores, dtype=np.float64)
    genuine = np.asarray([] if genuine_scores is None else genuine_scores, dtype=np.float64)
    report = {}
    for name, fmr in FMR_POINTS.items():
        point = operating_point(impostor, genuine, fmr)
        entry = {
            "threshold": round(point["threshold"], 6),
            "fmr": point["fmr"],
            "impostors": int(len(impostor)),
        }
        if genuine.size:
            entry["tmr"] = point["tmr"]
        report[name] = entry
    return report


def tmr_at_fmr_points(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """TMR at FMR 1e-3 and 1e-2 over the pairs themselves (:func:`operating_point`)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, bool)
    return {
        f"tmr_at_fmr_{f:g}": operating_point(scores[~labels], scores[labels], f)["tmr"]
        for f in (1e-3, 1e-2)
    }


def impostor_scores_all(
    embeddings: np.ndarray, identities: list[str], chunk: int = 1024
) -> np.ndarray:
    """Cosine of every pair of embeddings with different identities (upper triangle)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    ids = np.asarray(identities)
    parts = []
    for start in range(0, len(emb), chunk):
        block = emb[start : start + chunk] @ emb.T
        rows = np.arange(start, min(start + chunk, len(emb)))
        upper = np.arange(len(emb))[None, :] > rows[:, None]
        different = ids[rows][:, None] != ids[None, :]
        parts.append(block[upper & different])
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def fallback_landmarks(
    shape: tuple[int, ...], template: np.ndarray, crop_size: tuple[int, int]
) -> np.ndarray:
    """Template landmarks placed in the image's central square: the protocol's stand-in
    for the face of an image where none was detected (``facegate eval-pairs``,
    ``facegate-train evaluate``)."""
    h, w = shape[:2]
    side = NO_FACE_FRACTION * min(h, w)
    scale = side / max(crop_size)
    offset = np.array([(w - side) / 2, (h - side) / 2], dtype=np.float32)
    return np.asarray(template, np.float32) * scale + offset
