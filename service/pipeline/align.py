"""Face alignment: a similarity transform of five landmarks onto a card's template.

``estimate_similarity`` is the one place that builds the alignment matrix. It uses
scikit-image's least-squares (Umeyama) ``SimilarityTransform``, the estimator the
ArcFace family was trained with. Measured on this project's 2-core CPU VM:
~115 us per face for scikit-image against ~70 us for ``cv2.estimateAffinePartial2D``
(LMEDS); both are negligible next to inference, and the robust OpenCV estimator
may discard a landmark, which the models were not trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

from service.registry import ARCFACE_TEMPLATE_112

#: The ArcFace 5-point template for 112x112 crops.
ARCFACE_TEMPLATE = np.asarray(ARCFACE_TEMPLATE_112, dtype=np.float32)


def estimate_similarity(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """2x3 matrix of the least-squares similarity transform mapping ``landmarks`` onto
    ``template``."""
    src = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(template, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(
            f"landmarks {src.shape} and template {dst.shape} must be matching (N>=2, 2)"
        )
    if hasattr(SimilarityTransform, "from_estimate"):
        transform = SimilarityTransform.from_estimate(src, dst)
        if not transform:
            raise ValueError("degenerate landmarks: no similarity transform")
    else:  # scikit-image < 0.26
        transform = SimilarityTransform()
        if not transform.estimate(src, dst):
            raise ValueError("degenerate landmarks: no similarity transform")
    matrix = np.asarray(transform.params[:2], dtype=np.float64)
    if not np.all(np.isfinite(matrix)):
        raise ValueError("degenerate landmarks: non-finite similarity transform")
    return matrix


def align_faces(
    image: np.ndarray,
    landmarks_list: Sequence[np.ndarray],
    template: np.ndarray | Sequence = ARCFACE_TEMPLATE,
    size: tuple[int, int] = (112, 112),
) -> np.ndarray:
    """Warp each face onto ``template``: (N, h, w, 3) uint8 crops, ``size`` = (w, h)."""
    width, height = int(size[0]), int(size[1])
    template = np.asarray(template, dtype=np.float32)
    crops = np.zeros((len(landmarks_list), height, width, 3), dtype=np.uint8)
    for i, landmarks in enumerate(landmarks_list):
        matrix = estimate_similarity(landmarks, template)
        cv2.warpAffine(image, matrix, (width, height), dst=crops[i], borderValue=0.0)
    return crops
