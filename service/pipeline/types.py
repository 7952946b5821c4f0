"""Value types and interfaces shared by every pipeline stage.

Images travel as ``numpy.ndarray`` of shape (H, W, 3), dtype uint8, **BGR**
(OpenCV order) after decoding; each model's card says what it wants and the
stage converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Detection:
    """One face in original-image pixel coordinates."""

    box: np.ndarray  # (4,) float32: x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left mouth, right mouth

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def to_dict(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 5),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
        }


@dataclass
class FaceResult:
    """A detected face with its embedding (L2-normalised float32)."""

    detection: Detection
    embedding: np.ndarray | None = None


@dataclass
class Timings:
    """Seconds spent per stage for one request (reported when asked, and to metrics)."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


class Detector(Protocol):
    """Finds faces; implementations live in ``service.pipeline.detectors``."""

    card: object  # service.registry.ModelCard

    def detect(self, image: np.ndarray) -> list[Detection]: ...

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]: ...


class Embedder(Protocol):
    """Turns aligned crops into L2-normalised embeddings."""

    card: object  # service.registry.ModelCard
    model_id: str
    dim: int

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, h, w, 3) uint8 BGR aligned crops -> (N, dim) float32, L2-normalised."""
        ...
