"""Verification evaluation: LFW-style pairs, ROC, TAR@FAR, threshold calibration,
JSON + PNG reports.

The protocol is the one InsightFace reports (``verification.py``): each face's
embedding is the sum of the embeddings of the crop and its mirror image,
L2-normalised; pairs are scored by cosine (equivalently squared distance
2 − 2·cos); the pairs are split into 10 contiguous folds; for each fold the
threshold with the best accuracy on the other 9 is applied to it; the result
is the mean ± std over folds.  The fold arithmetic and the false-match-rate
calibration are the service's (``service.pipeline.pairs``), so ``facegate
eval-pairs`` and this module cannot disagree; the one difference from
InsightFace's script is that the threshold is searched exactly over the
observed scores rather than on a 0.01 grid of distances.

Inputs: ``pairs.txt`` + a folder of aligned crops (``facegate-train prepare``
output; a missing crop — no face found — is aligned from the raw image's
central square, as ``facegate eval-pairs`` does), or an InsightFace ``.bin``
(pickled JPEG list + ``issame`` list; read with a restricted unpickler).
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import auc, roc_curve

from service.pipeline.pairs import (
    FMR_POINTS,
    Pair,
    fmr_threshold,
    fmr_thresholds,
    impostor_scores_all,
    kfold_accuracy,
    operating_point,
    parse_pairs,
)

#: false-accept rates reported as TAR@FAR (largest TAR with FAR <= the target, as in IJB-C)
FAR_POINTS = (1e-1, 1e-2, 1e-3, 1e-4)

EmbedFn = Callable[[np.ndarray], np.ndarray]  # (N, 112, 112, 3) uint8 BGR -> (N, d) float32


@dataclass
class PairSet:
    """Aligned face crops and the pairs over them."""

    images: np.ndarray  # (N, H, W, 3) uint8 BGR aligned crops
    first: np.ndarray  # (P,) index into images
    second: np.ndarray
    same: np.ndarray  # (P,) bool
    folds: np.ndarray  # (P,) int
    identities: list[str] | None = None  # per image, for calibration over all impostor pairs
    name: str = "pairs"


def _read_crop(aligned_root: Path, key: str) -> np.ndarray | None:
    stem = Path(key).with_suffix("")
    for suffix in (".png", ".jpg"):
        path = aligned_root / (str(stem) + suffix)
        if path.is_file():
            return cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None


def _fallback_crop(raw_root: Path, key: str, size: int = 112) -> np.ndarray:
    """No face found: align the raw image's central square, as ``facegate eval-pairs`` does."""
    from service.pipeline.align import ARCFACE_TEMPLATE, align_faces
    from service.pipeline.pairs import fallback_landmarks

    image = cv2.imread(str(raw_root / key), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"no aligned crop and no raw image for {key}")
    template = ARCFACE_TEMPLATE * (size / 112.0)
    landmarks = fallback_landmarks(image.shape, template, (size, size))
    return align_faces(image, [landmarks], template, (size, size))[0]


def load_pairs(
    pairs_path: Path | str,
    aligned_root: Path | str,
    raw_root: Path | str | None = None,
    folds: int | None = None,
    max_pairs_per_fold: int | None = None,
) -> PairSet:
    """A :class:`PairSet` from ``pairs.txt`` and aligned crops (optionally the first
    ``folds`` folds)."""
    pairs = parse_pairs(pairs_path)
    if folds is not None:
        pairs = [p for p in pairs if p.fold < folds]
    if max_pairs_per_fold is not None:  # keep the same/different balance of each fold
        kept: list[Pair] = []
        count: dict[tuple[int, bool], int] = {}
        for p in pairs:
            bucket = (p.fold, p.same)
            if count.get(bucket, 0) < max_pairs_per_fold // 2:
                kept.append(p)
                count[bucket] = count.get(bucket, 0) + 1
        pairs = kept
    keys = sorted({p.a for p in pairs} | {p.b for p in pairs})
    index = {k: i for i, k in enumerate(keys)}
    aligned_root = Path(aligned_root)
    crops = []
    for key in keys:
        crop = _read_crop(aligned_root, key)
        if crop is None:
            if raw_root is None:
                raise FileNotFoundError(f"{key}: no crop in {aligned_root} and no raw_root given")
            crop = _fallback_crop(Path(raw_root), key)
        crops.append(crop)
    return PairSet(
        images=np.stack(crops),
        first=np.array([index[p.a] for p in pairs]),
        second=np.array([index[p.b] for p in pairs]),
        same=np.array([p.same for p in pairs]),
        folds=np.array([p.fold for p in pairs]),
        identities=[k.split("/")[0] for k in keys],
        name=Path(pairs_path).parent.name or "pairs",
    )


class _BinUnpickler(pickle.Unpickler):
    """Only what an InsightFace ``.bin`` holds: lists, tuples, bytes, bools, numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a verification .bin")


def load_bin(path: Path | str, size: int = 112) -> PairSet:
    """An InsightFace verification ``.bin`` (``lfw.bin``, ``cfp_fp.bin`` ...): pairs (2i, 2i+1)."""
    with open(path, "rb") as fh:
        bins, issame = _BinUnpickler(fh, encoding="bytes").load()
    images = []
    for data in bins:
        image = cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{path}: an entry is not an image")
        if image.shape[:2] != (size, size):
            image = cv2.resize(image, (size, size))
        images.append(image)
    n = len(issame)
    if len(images) != 2 * n:
        raise ValueError(f"{path}: {len(images)} images for {n} pairs")
    return PairSet(
        images=np.stack(images),
        first=np.arange(0, 2 * n, 2),
        second=np.arange(1, 2 * n, 2),
        same=np.asarray(issame, bool),
        folds=np.arange(n) * 10 // n,
        name=Path(path).stem,
    )


def write_bin(path: Path | str, pair_set: PairSet) -> None:
    """Write a :class:`PairSet` as an InsightFace-style ``.bin`` (JPEG crops, consecutive pairs)."""
    bins = []
    for a, b in zip(pair_set.first, pair_set.second, strict=True):
        for i in (a, b):
            ok, buf = cv2.imencode(".jpg", pair_set.images[i], [cv2.IMWRITE_JPEG_QUALITY, 95])
            bins.append(buf.tobytes())
    with open(path, "wb") as fh:
        pickle.dump((bins, [bool(s) for s in pair_set.same]), fh, protocol=4)


def flip_embeddings(embed: EmbedFn, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """L2-normalised (embedding(crop) + embedding(mirrored crop)), the InsightFace test-time
    rule."""
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        vec = embed(chunk) + embed(np.ascontiguousarray(chunk[:, :, ::-1]))
        out.append(vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out).astype(np.float32)


def tar_at_far(scores: np.ndarray, same: np.ndarray, fars: Sequence[float] = FAR_POINTS) -> dict:
    """TAR at each FAR: the largest TAR of any threshold whose FAR is <= the target, with the
    FAR it measures and that threshold (``score >= threshold`` accepts), as the IJB-C protocol
    reports verification; the rule is :func:`service.pipeline.pairs.operating_point`'s, the
    one that calibrates the card's thresholds.  Below the smallest nonzero FAR (one impostor
    pair) this is the TAR at FAR 0."""
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, bool)
    impostors = scores[~same]
    out = {}
    for far in fars:
        point = operating_point(impostors, scores[same], far)
        out[f"{far:.0e}"] = {
            "tar": round(point["tmr"], 6),
            "far": round(point["fmr"], 6),
            "threshold": point["threshold"],
            # fewer than 1/FAR impostor pairs cannot measure that FAR
            "resolvable": bool(far * len(impostors) >= 1),
        }
    return out


def verification_report(embeddings: np.ndarray, pair_set: PairSet, calibrate: bool = True) -> dict:
    """Accuracy (k-fold mean ± std), ROC summary, TAR@FAR and FMR-calibrated thresholds."""
    scores = np.sum(embeddings[pair_set.first] * embeddings[pair_set.second], axis=1)
    n_folds = len(np.unique(pair_set.folds))
    if n_folds > 1:
        mean, std, per_fold, thresholds = kfold_accuracy(scores, pair_set.same, pair_set.folds)
    else:
        from service.pipeline.pairs import best_threshold

        t = best_threshold(scores, pair_set.same)
        mean = float(np.mean((scores >= t) == pair_set.same))
        std, per_fold, thresholds = 0.0, [], [t]
    fpr, tpr, _ = roc_curve(pair_set.same.astype(int), scores)
    report = {
        "dataset": pair_set.name,
        "pairs": len(scores),
        "images": len(pair_set.images),
        "folds": int(n_folds),
        "accuracy": round(mean, 6),
        "std": round(std, 6),
        "fold_accuracies": [round(a, 6) for a in per_fold],
        "fold_thresholds": [round(t, 6) for t in thresholds],
        "auc": round(float(auc(fpr, tpr)), 6),
        "tar_at_far": tar_at_far(scores, pair_set.same),
        "protocol": (
            "flip-summed embeddings, cosine, contiguous folds, threshold from the other folds"
        ),
    }
    if calibrate:
        if pair_set.identities is not None:
            impostors = impostor_scores_all(embeddings, pair_set.identities)
            source = "every pair of evaluated images with different identities"
        else:
            impostors = scores[~pair_set.same]
            source = "impostor pairs of the pair list"
        report["calibration"] = {
            "impostor_source": source,
            **fmr_thresholds(impostors, scores[pair_set.same]),
        }
        # unrounded, for the card: a rounded-down threshold would admit extra impostors
        report["thresholds"] = {
            name: float(fmr_threshold(impostors, fmr)) for name, fmr in FMR_POINTS.items()
        }
    report["_roc"] = (fpr, tpr)
    return report


def card_thresholds(report: dict) -> dict[str, float]:
    """``{"fmr_1e-3": cosine, ...}`` for a model card, from a report's calibration."""
    return dict(report.get("thresholds", {}))


def save_report(report: dict, out_dir: Path | str, stem: str = "verification") -> dict[str, Path]:
    """Write ``<stem>.json`` and a ROC plot ``<stem>_roc.png``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fpr, tpr = report.get("_roc", (None, None))
    clean = {k: v for k, v in report.items() if not k.startswith("_")}
    paths = {"json": out_dir / f"{stem}.json"}
    paths["json"].write_text(json.dumps(clean, indent=2))
    if fpr is not None:
        paths["roc"] = out_dir / f"{stem}_roc.png"
        title = f"{clean['dataset']}: {100 * clean['accuracy']:.2f}% ± {100 * clean['std']:.2f}"
        paths["roc"].write_bytes(roc_png(fpr, tpr, title))
    return paths


def roc_png(fpr: np.ndarray, tpr: np.ndarray, title: str) -> bytes:
    """A log-FAR ROC curve as PNG bytes (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    keep = fpr > 0
    ax.plot(fpr[keep], tpr[keep], lw=1.5)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def torch_embedder(
    model, device: str = "cpu", batch: int = 64, input_size: int | None = None, mean=None, std=None
) -> EmbedFn:
    """An :data:`EmbedFn` over a PyTorch backbone (eval mode, the training normalisation and resize;
    ``mean``/``std``: the backbone's contract, default the package's own)."""
    import torch

    from training.data import MEAN, STD, resize

    mean = np.asarray(MEAN if mean is None else mean, dtype=np.float32)
    std = np.asarray(STD if std is None else std, dtype=np.float32)

    def embed(crops: np.ndarray) -> np.ndarray:
        model.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(crops), batch):
                chunk = np.stack([resize(c, input_size) for c in crops[start : start + batch]])
                rgb = np.ascontiguousarray(chunk[..., ::-1], dtype=np.float32)
                x = torch.from_numpy((rgb - mean) / std).permute(0, 3, 1, 2).to(device)
                out.append(model(x).float().cpu().numpy())
        return np.concatenate(out)

    return embed


def onnx_embedder(card, path, settings=None) -> EmbedFn:
    """An :data:`EmbedFn` over an exported model, through the service's ``OnnxEmbedder``.

    The service's embedder normalises its output; flip-summing normalised
    vectors is what the service does with ``FACEGATE_FLIP_AUGMENT``.
    """
    from service.config import Settings
    from service.pipeline.embed import OnnxEmbedder

    embedder = OnnxEmbedder(
        card, path, settings or Settings(providers=["CPUExecutionProvider"]), flip=False
    )
    return lambda crops: embedder.embed(crops, flip=False)


def evaluate_model(embed: EmbedFn, pair_set: PairSet, calibrate: bool = True) -> dict:
    """Flip-summed embeddings of every image, then :func:`verification_report`."""
    return verification_report(flip_embeddings(embed, pair_set.images), pair_set, calibrate)
