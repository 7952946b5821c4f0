"""Which faces of an image are kept, and what is known about each: one home for the rules.

* :func:`main_face`: **the** main face of an image is its largest one (box area). REST
  (``/v1/verify``, enrolment), the CLI (``facegate verify``, ``eval-pairs``), re-enrolment
  and ``facegate-train prepare`` all keep it by this rule.
* :func:`select_faces`: the several-faces policies a request can ask for.
* :func:`face_quality`: the quality figures reported for a face and stored with it.
* :class:`Faces`: what :meth:`service.pipeline.pipeline.Pipeline.locate` finds in one image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from .errors import FaceTooSmall, LowQualityFace, MultipleFaces, NoFace
from .types import Detection

#: ``largest``: the main face; ``refuse``: exactly one face; ``enrol``: exactly one face
#: above the enrolment quality floor; ``all``: every face, largest first.
Policy = Literal["largest", "refuse", "all", "enrol"]
POLICIES: tuple[str, ...] = ("largest", "refuse", "all", "enrol")


@dataclass(frozen=True)
class QualityFloor:
    """The least a face must offer to be enrolled (policy ``enrol``)."""

    min_size: float = 0.0  # shorter side of the box, px
    min_score: float = 0.0  # detection score


@dataclass
class Faces:
    """The faces kept from one image, aligned, and (once embedded) their embeddings."""

    detections: list[Detection]  # kept by the policy, in its order
    crops: np.ndarray  # (n, h, w, 3) uint8 BGR aligned crops
    image_size: tuple[int, int]  # (width, height)
    detected: int  # faces the detector found, before the policy
    #: (n, dim) float32, L2-normalised, once embedded (``Pipeline.embed_faces``); empty before
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def describe(self) -> list[dict]:
        """Every kept face as box, score, landmarks and its :func:`face_quality` figures."""
        return [
            {**detection.to_dict(), "quality": face_quality(detection, crop)}
            for detection, crop in zip(self.detections, self.crops, strict=True)
        ]


def main_face(detections: list[Detection]) -> Detection | None:
    """The main face of an image: the largest box (None when there is no face)."""
    return max(detections, key=lambda d: d.area) if detections else None


def select_faces(
    detections: list[Detection],
    policy: Policy,
    *,
    floor: QualityFloor = QualityFloor(),
    allow_none: bool = False,
    limit: int | None = None,
) -> list[Detection]:
    """Apply a several-faces policy (see :data:`Policy`).

    No face is a ``NoFace`` error unless ``allow_none`` (then no face is kept); ``all``
    keeps every face, largest first, at most ``limit`` of them.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown face policy {policy!r}")
    face = main_face(detections)
    if face is None:
        if allow_none:
            return []
        raise NoFace("no face was found in the image")
    if policy == "all":
        return sorted(detections, key=lambda d: d.area, reverse=True)[:limit]
    if policy in ("refuse", "enrol") and len(detections) > 1:
        raise MultipleFaces(f"{len(detections)} faces were found; exactly one is required")
    if policy == "enrol":
        size = min(face.width, face.height)
        if size < floor.min_size:
            raise FaceTooSmall(
                f"the face is {size:.0f} px; enrolment needs at least {floor.min_size:g} px"
            )
        if face.score < floor.min_score:
            raise LowQualityFace(
                f"the face's detection score {face.score:.3f} is under the enrolment minimum "
                f"{floor.min_score}"
            )
    return [face]


def face_quality(detection: Detection, crop: np.ndarray) -> dict[str, float]:
    """Quality figures of one face: detection score, size, sharpness and a pose estimate.

    ``sharpness`` is the variance of the Laplacian of the aligned crop (low: blurred);
    ``roll_deg`` is the angle of the eye line; ``yaw_ratio`` is the nose's horizontal
    offset from the eyes' midpoint over the inter-eye distance (0: frontal, about
    +-0.5: strong profile).
    """
    lm = np.asarray(detection.landmarks, dtype=np.float64)
    left_eye, right_eye, nose = lm[0], lm[1], lm[2]
    eye_vec = right_eye - left_eye
    eye_dist = float(np.hypot(*eye_vec)) or 1.0
    roll = float(np.degrees(np.arctan2(eye_vec[1], eye_vec[0])))
    mid = (left_eye + right_eye) / 2.0
    yaw = float(np.dot(nose - mid, eye_vec) / (eye_dist * eye_dist))
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    sharpness = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    return {
        "det_score": round(float(detection.score), 5),
        "face_width_px": round(detection.width, 1),
        "face_height_px": round(detection.height, 1),
        "face_size_px": round(min(detection.width, detection.height), 1),
        "sharpness": round(sharpness, 2),
        "roll_deg": round(roll, 2),
        "yaw_ratio": round(yaw, 4),
    }
