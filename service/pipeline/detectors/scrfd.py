"""SCRFD (InsightFace) with keypoints: 9 outputs = score/bbox/kps at strides 8, 16, 32.

Boxes and landmarks are distances from each anchor point, in units of the
stride; two anchors per cell. Fixed-size exports (640x640) are letterboxed;
dynamic ones run at the image's own size rounded to a multiple of 32.
"""

from __future__ import annotations

import numpy as np

from .base import OnnxDetector, grid_centers

STRIDES = (8, 16, 32)


class SCRFDDetector(OnnxDetector):
    def _setup(self) -> None:
        if len(self.output_names) != 9:
            raise ValueError(
                f"{self.path}: expected SCRFD with keypoints (9 outputs), "
                f"got {len(self.output_names)}"
            )
        self.batched_outputs = len(self.session.get_outputs()[0].shape) == 3

    def decode(self, outputs, index, input_size):
        width, height = input_size
        all_boxes, all_scores, all_kps = [], [], []
        for level, stride in enumerate(STRIDES):
            scores = outputs[level]
            bbox = outputs[level + 3]
            kps = outputs[level + 6]
            if self.batched_outputs:
                scores, bbox, kps = scores[index], bbox[index], kps[index]
            scores = scores.reshape(-1)
            rows, cols = height // stride, width // stride
            per_cell = scores.shape[0] // (rows * cols)
            keep = np.flatnonzero(scores >= self.score_threshold)
            if keep.size == 0:
                continue
            centers = grid_centers(rows, cols, stride, per_cell)[keep]
            dist = bbox.reshape(-1, 4)[keep] * stride
            all_boxes.append(np.concatenate([centers - dist[:, :2], centers + dist[:, 2:]], axis=1))
            all_kps.append(centers[:, None, :] + kps.reshape(-1, 5, 2)[keep] * stride)
            all_scores.append(scores[keep])
        if not all_scores:
            return (
                np.zeros((0, 4), np.float32),
                np.zeros(0, np.float32),
                np.zeros((0, 5, 2), np.float32),
            )
        return np.concatenate(all_boxes), np.concatenate(all_scores), np.concatenate(all_kps)
