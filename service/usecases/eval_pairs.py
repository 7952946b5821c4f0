"""The LFW pair-verification protocol, end to end (``facegate eval-pairs``; the pairs-file
path of ``facegate models calibrate``).

Every image referenced by the pairs file is decoded, its main face (the largest) detected,
aligned and embedded; pairs are scored by cosine; accuracy is the 10-fold mean and std
(threshold chosen on the other folds). When no face is found, the image's central square
(``NO_FACE_FRACTION`` of the shorter side, see ``service.pipeline.pairs.fallback_landmarks``)
is aligned as if it were the face and the image is counted in ``no_face``. Thresholds at
named FMRs come from the scores of every pair of evaluated images with different
identities, through :mod:`service.pipeline.calibration` (:func:`pair_file_scores`, which
``facegate models calibrate --pairs`` uses too).

With a chips directory the aligned chips are kept there (one ``.npz`` per detector,
detector input, alignment template and crop size, and image list) and reused.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.pipeline.calibration import Scores, operating_points, tally
from service.pipeline.pairs import FMR_POINTS, Pair, parse_pairs


def align_images(pipeline, paths: list[Path], workers: int) -> tuple[np.ndarray, list[bool]]:
    """(N, h, w, 3) aligned chips of each image's main face (the pipeline's analysis path,
    policy ``largest``), and whether the no-face fallback was used."""
    from service.pipeline.align import align_faces
    from service.pipeline.pairs import fallback_landmarks

    def one(path: Path) -> tuple[np.ndarray, bool]:
        image = pipeline.decode(path.read_bytes())
        faces = pipeline.locate(image, "largest", allow_none=True)
        if not faces.detections:
            landmarks = fallback_landmarks(image.shape, pipeline.template, pipeline.crop_size)
            chip = align_faces(image, [landmarks], pipeline.template, pipeline.crop_size)[0]
            return chip, True
        return faces.crops[0], False

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, paths))
    else:
        results = [one(p) for p in paths]
    return np.stack([r[0] for r in results]), [r[1] for r in results]


def chips_key(pipeline, paths: list[Path]) -> str:
    """What the chips depend on: detector weights and input, crop template and size, images."""
    parts = [
        pipeline.detector_card.id,
        str(getattr(pipeline.detector, "fixed_size", None)),
        np.asarray(pipeline.template, np.float32).round(4).tobytes().hex(),
        str(tuple(pipeline.crop_size)),
        *map(str, paths),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cached_chips(
    pipeline, paths: list[Path], workers: int, directory: Path | None
) -> tuple[np.ndarray, list[bool]]:
    """``align_images``, read from / written to ``directory`` when given."""
    if directory is None:
        return align_images(pipeline, paths, workers)
    path = Path(directory) / f"chips-{pipeline.detector_card.name}-{chips_key(pipeline, paths)}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["chips"], [bool(f) for f in data["fallback"]]
    chips, fallback = align_images(pipeline, paths, workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, chips=chips, fallback=np.asarray(fallback))
    tmp.replace(path)
    return chips, fallback


def embed_images(
    pipeline, paths: list[Path], workers: int, chips_dir: Path | None = None
) -> tuple[np.ndarray, list[bool]]:
    """(N, dim) embeddings of each image's main face, and whether the fallback was used."""
    chips, fallback = cached_chips(pipeline, paths, workers, chips_dir)
    batch = 64
    vectors = [pipeline.embed(chips[i : i + batch]) for i in range(0, len(chips), batch)]
    return np.concatenate(vectors), fallback


def evaluate(
    pipeline,
    pairs_path: Path,
    images_dir: Path,
    limit_folds: int | None = None,
    workers: int = 1,
    chips_dir: Path | None = None,
) -> dict:
    """The full report as a dict (see the module docstring); flip-augmented when the
    pipeline's embedder is (``--flip``: ``FACEGATE_FLIP_AUGMENT``)."""
    from service.pipeline.pairs import kfold_accuracy, tmr_at_fmr_points

    scored = pair_file_scores(pipeline, pairs_path, images_dir, limit_folds, workers, chips_dir)
    pairs, keys, fallback, elapsed = scored.pairs, scored.keys, scored.fallback, scored.seconds
    embeddings, index = scored.embeddings, {k: i for i, k in enumerate(scored.keys)}
    scores = np.array([float(embeddings[index[p.a]] @ embeddings[index[p.b]]) for p in pairs])
    labels = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    n_folds = len(np.unique(folds))
    if n_folds > 1:
        accuracy, std, per_fold, thresholds = kfold_accuracy(scores, labels, folds)
        protocol = f"{n_folds}-fold, threshold from the other folds"
    else:
        from service.pipeline.pairs import best_threshold

        threshold = best_threshold(scores, labels)
        accuracy = float(np.mean((scores >= threshold) == labels))
        std, per_fold, thresholds = 0.0, [accuracy], [threshold]
        protocol = "single fold, threshold fitted on the same fold"
    points = operating_points(scored.scores, FMR_POINTS, replicates=0, rule_of_30=False)
    calibrated = {
        p.name: {
            "threshold": round(p.threshold, 6),
            "fmr": p.fmr,
            "impostors": scored.scores.impostors,
            "tmr": float(np.mean(scored.scores.genuine >= p.threshold)),
        }
        for p in points.points
    }
    return {
        "accuracy": round(accuracy, 6),
        "std": round(std, 6),
        "pairs": len(pairs),
        "folds": n_folds,
        "protocol": protocol,
        "fold_accuracies": [round(a, 6) for a in per_fold],
        "fold_thresholds": [round(t, 6) for t in thresholds],
        "images": len(keys),
        "no_face": int(sum(fallback)),
        "images_per_second": round(len(keys) / elapsed, 3),
        "seconds": round(elapsed, 2),
        "detector": pipeline.detector_card.name,
        "detector_input": (
            "{}x{} letterbox".format(*pipeline.detector.fixed_size)
            if getattr(pipeline.detector, "fixed_size", None)
            else "per image"
        ),
        "recognizer": pipeline.recognizer_card.name,
        "model_id": pipeline.model_id,
        "flip": bool(getattr(pipeline.embedder, "flip", False)),
        "workers": workers,
        "thresholds": calibrated,
        **tmr_at_fmr_points(scores, labels),
    }


@dataclass(frozen=True)
class PairFileScores:
    """The images of a pairs file embedded, and the protocol's tally of their pairs."""

    pairs: list[Pair]
    keys: list[str]  # image keys "Name/Name_0001.jpg", sorted; rows of ``embeddings``
    embeddings: np.ndarray
    fallback: list[bool]
    seconds: float
    #: Genuine pairs: the listed same-identity pairs; impostors: every pair of images of
    #: two different identities.
    scores: Scores


def pair_file_scores(
    pipeline,
    pairs_path: Path,
    images_dir: Path,
    limit_folds: int | None = None,
    workers: int = 1,
    chips_dir: Path | None = None,
) -> PairFileScores:
    """Embed every image a ``pairs.txt`` names and tally its pairs (module docstring)."""
    pairs = parse_pairs(pairs_path)
    if limit_folds:
        pairs = [p for p in pairs if p.fold < limit_folds]
    keys = sorted({p.a for p in pairs} | {p.b for p in pairs})
    index = {k: i for i, k in enumerate(keys)}
    start = time.perf_counter()
    embeddings, fallback = embed_images(
        pipeline, [Path(images_dir) / k for k in keys], workers, chips_dir
    )
    elapsed = time.perf_counter() - start
    same = np.array([[index[p.a], index[p.b]] for p in pairs if p.same], dtype=np.int64)
    identities = [k.split("/")[0] for k in keys]
    scores = tally(embeddings, identities, genuine_pairs=same.reshape(-1, 2))
    return PairFileScores(pairs, keys, embeddings, fallback, elapsed, scores)
