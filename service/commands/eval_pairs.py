"""``facegate eval-pairs``: the LFW pair-verification protocol, end to end.

Every image referenced by the pairs file is decoded, its main face (the largest) detected,
aligned and embedded; pairs are scored by cosine; accuracy is the 10-fold mean
and std (threshold chosen on the other folds). With ``--limit-folds 1`` the
threshold is fitted on the fold itself (reported as ``protocol``). When no face
is found, the image's central square (``NO_FACE_FRACTION`` of the shorter side, see
``service.pipeline.pairs.fallback_landmarks``) is aligned as if it were the face and
the image is counted in ``no_face``.
Thresholds at FMR 1e-2/1e-3/1e-4 come from the scores of every pair of evaluated
images with different identities.

With ``--chips DIR`` the aligned chips are kept in ``DIR`` (one ``.npz`` per detector,
detector input, alignment template and crop size, and image list) and reused: models
that share a crop contract (e.g. ``dlib_resnet_v1`` and models fine-tuned from it) are
compared on the very same chips, and only the embedding is run again.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.helptext import summary

from ._options import add_model_options, load_pipeline, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval-pairs", help="LFW-style pair verification accuracy", description=summary(__doc__)
    )
    parser.add_argument("--pairs", type=Path, required=True, help="pairs.txt")
    parser.add_argument(
        "--images", type=Path, required=True, help="directory holding <Name>/<Name>_<nnnn>.jpg"
    )
    add_model_options(parser)
    parser.add_argument("--flip", action="store_true", help="flip-augmented embeddings")
    parser.add_argument("--limit-folds", type=int, default=None, help="only the first K folds")
    parser.add_argument("--workers", type=int, default=1, help="images processed in parallel")
    parser.add_argument(
        "--letterbox",
        type=int,
        default=None,
        metavar="N",
        help="run a dynamic-input detector on an NxN letterbox for every image "
        "(as InsightFace's FaceAnalysis does with 640) instead of the "
        "image's own size",
    )
    parser.add_argument(
        "--chips",
        type=Path,
        default=None,
        metavar="DIR",
        help="cache the aligned chips in DIR and reuse them for every model with "
        "the same detector and crop contract",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON report")
    parser.set_defaults(func=run)


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
    from service.pipeline.pairs import (
        fmr_thresholds,
        impostor_scores_all,
        kfold_accuracy,
        parse_pairs,
        tmr_at_fmr_points,
    )

    pairs = parse_pairs(pairs_path)
    if limit_folds:
        pairs = [p for p in pairs if p.fold < limit_folds]
    keys = sorted({p.a for p in pairs} | {p.b for p in pairs})
    index = {k: i for i, k in enumerate(keys)}
    start = time.perf_counter()
    embeddings, fallback = embed_images(
        pipeline, [images_dir / k for k in keys], workers, chips_dir
    )
    elapsed = time.perf_counter() - start
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
    identities = [k.split("/")[0] for k in keys]
    impostors = impostor_scores_all(embeddings, identities)
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
        "flip": bool(pipeline.settings.flip_augment),
        "workers": workers,
        "thresholds": fmr_thresholds(impostors, scores[labels]),
        **tmr_at_fmr_points(scores, labels),
    }


def run(args) -> int:

    settings = settings_from_args(args, **({"flip_augment": True} if args.flip else {}))
    pipeline = load_pipeline(settings)
    if pipeline is None:
        return 2
    if args.letterbox:
        pipeline.detector.use_fixed_input((args.letterbox, args.letterbox))
    report = evaluate(
        pipeline,
        args.pairs,
        args.images,
        limit_folds=args.limit_folds,
        workers=max(1, args.workers),
        chips_dir=args.chips,
    )
    if not args.json:
        print(
            f"{report['detector']} + {report['recognizer']}: accuracy "
            f"{report['accuracy'] * 100:.2f}% ± {report['std'] * 100:.2f} over "
            f"{report['pairs']} pairs, no_face {report['no_face']}, "
            f"{report['images_per_second']:.1f} images/s",
            file=sys.stderr,
        )
    print(json.dumps(report))
    return 0
