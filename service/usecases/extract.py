"""Detect and embed: the faces of one image, with their quality figures and embeddings.

The building blocks of the other use cases, for clients that keep their own index: every
kept face's box, score, landmarks and the quality figures enrolment computes, and (with
``embed``) its L2-normalised embedding.  An image without a face is no error here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.pipeline.faces import Policy
from service.pipeline.types import Detection, Timings

from .work import Worker


@dataclass(frozen=True)
class ExtractedFace:
    detection: Detection
    quality: dict[str, float]  # :func:`service.pipeline.faces.face_quality`
    embedding: np.ndarray | None  # (dim,) float32, L2-normalised, when embedded

    def to_dict(self) -> dict[str, Any]:
        """Box, score, landmarks and ``quality`` (the answer of ``/v1/detect``)."""
        return {**self.detection.to_dict(), "quality": self.quality}


@dataclass(frozen=True)
class Extraction:
    width: int
    height: int
    detected: int  # faces the detector found, before the policy
    faces: tuple[ExtractedFace, ...]  # kept by the policy, in its order


async def extract_faces(
    *,
    work: Worker,
    image: bytes,
    timings: Timings,
    policy: Policy = "all",
    limit: int | None = None,
    embed: bool = False,
) -> Extraction:
    """The faces ``policy`` keeps from ``image`` (at most ``limit``), with their quality
    figures and, with ``embed``, their embeddings; no face: an empty ``faces``."""
    step = work.analyze if embed else work.locate
    found = await step(image, policy, timings, allow_none=True, limit=limit)
    described = await work.call(timings, "quality", found.describe)
    vectors: list[np.ndarray | None] = list(found.embeddings) if embed else [None] * len(described)
    faces = tuple(
        ExtractedFace(detection, face["quality"], vector)
        for detection, face, vector in zip(found.detections, described, vectors, strict=True)
    )
    return Extraction(found.image_size[0], found.image_size[1], found.detected, faces)
