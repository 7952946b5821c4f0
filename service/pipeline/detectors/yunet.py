"""YuNet (libfacedetection / OpenCV zoo, 2023mar): 12 outputs cls/obj/bbox/kps at strides 8, 16, 32.

One anchor per cell. Score = sqrt(clip(cls) * clip(obj)); box centre = (cell +
offset) * stride, size = exp(log-size) * stride; landmarks = (cell + offset) *
stride. Input is BGR in 0..255 without normalisation (from the card). This is the
decoding OpenCV's ``cv2.FaceDetectorYN`` performs.
"""

from __future__ import annotations

import numpy as np

from .base import OnnxDetector, grid_centers

STRIDES = (8, 16, 32)


class YuNetDetector(OnnxDetector):
    def _setup(self) -> None:
        if len(self.output_names) != 12:
            raise ValueError(
                f"{self.path}: expected YuNet with 12 outputs, got {len(self.output_names)}"
            )
        # Outputs are addressed by name (cls_8 ... kps_32) when the export names them.
        names = self.output_names
        wanted = [f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES]
        self.order = (
            [names.index(n) for n in wanted] if set(wanted) <= set(names) else list(range(12))
        )

    def decode(self, outputs, index, input_size):
        width, height = input_size
        outs = [outputs[k][index] if outputs[k].ndim == 3 else outputs[k] for k in self.order]
        all_boxes, all_scores, all_kps = [], [], []
        for level, stride in enumerate(STRIDES):
            cls = np.clip(outs[level].reshape(-1), 0.0, 1.0)
            obj = np.clip(outs[level + 3].reshape(-1), 0.0, 1.0)
            scores = np.sqrt(cls * obj)
            keep = np.flatnonzero(scores >= self.score_threshold)
            if keep.size == 0:
                continue
            cells = grid_centers(height // stride, width // stride, stride)[keep]
            bbox = outs[level + 6].reshape(-1, 4)[keep]
            centre = cells + bbox[:, :2] * stride
            size = np.exp(bbox[:, 2:]) * stride
            all_boxes.append(np.concatenate([centre - size / 2, centre + size / 2], axis=1))
            kps = outs[level + 9].reshape(-1, 5, 2)[keep]
            all_kps.append(cells[:, None, :] + kps * stride)
            all_scores.append(scores[keep])
        if not all_scores:
            return (
                np.zeros((0, 4), np.float32),
                np.zeros(0, np.float32),
                np.zeros((0, 5, 2), np.float32),
            )
        return np.concatenate(all_boxes), np.concatenate(all_scores), np.concatenate(all_kps)
