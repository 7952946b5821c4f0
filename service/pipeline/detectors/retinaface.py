"""RetinaFace MobileNet-0.25 (the PyTorch export): outputs loc / conf / landmarks over priors.

Priors are generated here (the export does not contain them): for strides 8,
16, 32 and anchor sizes (16, 32), (64, 128), (256, 512), one prior per anchor
size per cell, row-major. Offsets are decoded with variances (0.1, 0.2). The
export already applies the softmax to ``conf`` (column 1 = face). The output
named ``iou`` holds the 10 landmark offsets.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .base import OnnxDetector

STRIDES = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)


@lru_cache(maxsize=32)
def priors(width: int, height: int) -> np.ndarray:
    """(P, 4) float32 priors (cx, cy, w, h) in input pixels."""
    parts = []
    for stride, sizes in zip(STRIDES, MIN_SIZES, strict=True):
        rows, cols = int(np.ceil(height / stride)), int(np.ceil(width / stride))
        ys, xs = np.mgrid[:rows, :cols]
        cx = ((xs.reshape(-1) + 0.5) * stride).astype(np.float32)
        cy = ((ys.reshape(-1) + 0.5) * stride).astype(np.float32)
        per_size = [
            np.stack([cx, cy, np.full_like(cx, s), np.full_like(cx, s)], axis=1) for s in sizes
        ]
        parts.append(np.stack(per_size, axis=1).reshape(-1, 4))
    table = np.concatenate(parts)
    table.setflags(write=False)
    return table


class RetinaFaceDetector(OnnxDetector):
    def _setup(self) -> None:
        names = self.output_names
        if len(names) != 3:
            raise ValueError(f"{self.path}: expected RetinaFace with 3 outputs, got {len(names)}")
        self.order = (
            [names.index("loc"), names.index("conf"), names.index("iou")]
            if {"loc", "conf", "iou"} <= set(names)
            else [0, 1, 2]
        )

    def decode(self, outputs, index, input_size):
        loc, conf, landmarks = (outputs[k][index] for k in self.order)
        scores = conf[:, 1]
        keep = np.flatnonzero(scores >= self.score_threshold)
        table = priors(*input_size)
        if table.shape[0] != scores.shape[0]:
            raise ValueError(
                f"RetinaFace output has {scores.shape[0]} rows, expected "
                f"{table.shape[0]} priors for input {input_size}"
            )
        if keep.size == 0:
            return (
                np.zeros((0, 4), np.float32),
                np.zeros(0, np.float32),
                np.zeros((0, 5, 2), np.float32),
            )
        prior = table[keep]
        loc = loc[keep]
        centre = prior[:, :2] + loc[:, :2] * VARIANCES[0] * prior[:, 2:]
        size = prior[:, 2:] * np.exp(loc[:, 2:] * VARIANCES[1])
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        kps = (
            prior[:, None, :2]
            + landmarks[keep].reshape(-1, 5, 2) * VARIANCES[0] * prior[:, None, 2:]
        )
        return boxes, scores[keep], kps
