"""Value types and interfaces shared by every pipeline stage.

Images travel as ``numpy.ndarray`` of shape (H, W, 3), dtype uint8, **BGR**
(OpenCV order) after decoding; each model's card says what it wants and the
stage converts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from service.registry import ModelCard


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 5),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
        }


@dataclass
class Timings:
    """Seconds spent per stage for one request (reported when asked, and to metrics).

    A stage's figure is summed over the request's images; the stages of one request run
    one after another, so together they never exceed :meth:`elapsed`, the time since the
    request's ``Timings`` was made.
    """

    stages: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@runtime_checkable
class Detector(Protocol):
    """Finds faces; implementations live in ``service.pipeline.detectors``."""

    card: ModelCard

    def detect(self, image: np.ndarray) -> list[Detection]: ...

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]: ...


@runtime_checkable
class Embedder(Protocol):
    """Turns aligned crops into L2-normalised embeddings: the ONNX model
    (``service.pipeline.embed.OnnxEmbedder``) or the service's micro-batcher around it
    (``service.batching.MicroBatcher``)."""

    @property
    def card(self) -> ModelCard: ...

    @property
    def model_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, h, w, 3) uint8 BGR aligned crops -> (N, dim) float32, L2-normalised."""
        ...
