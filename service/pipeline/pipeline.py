"""The face pipeline: bytes -> decode -> detect -> align -> embed.

``Pipeline.from_settings`` resolves the detector and recognizer (manifest names or
``.onnx`` paths, sha256-verified by the registry), builds and warms both up. All
methods are safe to call from several threads at once (ONNX Runtime sessions are).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from service.registry import ARCFACE_TEMPLATE_112, Registry, default_registry, select_recognizer

from .align import align_faces
from .decode import MemoryBudget, decode_cost, decode_opened, read_header
from .detectors import build_detector
from .embed import OnnxEmbedder
from .types import Detection, FaceResult, Timings

log = logging.getLogger(__name__)


@contextmanager
def _timed(timings: Timings | None, stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings.add(stage, time.perf_counter() - start)


class Pipeline:
    """A detector and an embedder plus the decode/align glue between them."""

    def __init__(self, detector, embedder, settings, detector_card=None, recognizer_card=None,
                 recognizer_selection: str = "configured"):
        self.detector = detector
        self.embedder = embedder
        self.settings = settings
        self.detector_card = detector_card if detector_card is not None else detector.card
        self.recognizer_card = recognizer_card if recognizer_card is not None else embedder.card
        #: How the recognizer was chosen (:func:`service.registry.select_recognizer`):
        #: ``configured``, ``default`` or ``fallback``.
        self.recognizer_selection = recognizer_selection
        alignment = self.recognizer_card.alignment
        self.template = np.asarray(alignment.template if alignment else ARCFACE_TEMPLATE_112,
                                   dtype=np.float32)
        self.crop_size = tuple(alignment.size) if alignment else (112, 112)
        #: Bytes of decoded images in flight (``settings.decode_budget_bytes``).
        self.decode_budget = MemoryBudget(settings.decode_budget_bytes)

    @classmethod
    def from_settings(cls, settings, registry: Registry | None = None,
                      flip: bool | None = None) -> Pipeline:
        """Resolve, verify, build and warm up the configured detector and recognizer."""
        registry = registry or default_registry(settings)
        det_card, det_path = registry.resolve(settings.detector, task="detection")
        rec_ref, selection = select_recognizer(settings.recognizer, registry)
        if selection == "fallback":
            log.warning("FACEGATE_RECOGNIZER is unset and the default recognizer is not "
                        "installed; serving its installed fallback %s", rec_ref)
        rec_card, rec_path = registry.resolve(rec_ref, task="recognition")
        detector = build_detector(det_card, det_path, settings)
        embedder = OnnxEmbedder(rec_card, rec_path, settings, flip=flip)
        return cls(detector, embedder, settings, det_card, rec_card, selection)

    # -- stages ----------------------------------------------------------------------
    def decode(self, data: bytes) -> np.ndarray:
        with self.decoded(data) as image:
            return image

    @contextmanager
    def decoded(self, data: bytes, timings: Timings | None = None) -> Iterator[np.ndarray]:
        """The decoded image, its estimated memory (:func:`decode_cost`) held from the
        decode budget until the block ends: waits while other decodes fill the budget."""
        settings = self.settings
        img = read_header(data, settings.max_image_bytes, settings.max_image_pixels,
                          settings.max_decode_bytes)
        with self.decode_budget.reserve(decode_cost(img)):
            with _timed(timings, "decode"):
                image = decode_opened(img)
            yield image

    def detect(self, image: np.ndarray) -> list[Detection]:
        return self.detector.detect(image)

    def align(self, image: np.ndarray, detections: list[Detection]) -> np.ndarray:
        return align_faces(image, [d.landmarks for d in detections], self.template, self.crop_size)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return self.embedder.embed(crops)

    # -- whole requests ----------------------------------------------------------------
    def analyze_image(self, image: np.ndarray, timings: Timings | None = None) -> list[FaceResult]:
        """Every face of a decoded image, embedded in one batch, highest score first."""
        with _timed(timings, "detect"):
            detections = self.detect(image)
        return self._embed_faces([image], [detections], timings)[0]

    def analyze(self, data: bytes, timings: Timings | None = None
                ) -> tuple[np.ndarray, list[FaceResult]]:
        """Decode image bytes and return the image and all its faces with embeddings."""
        with _timed(timings, "decode"):
            image = self.decode(data)
        return image, self.analyze_image(image, timings)

    def analyze_batch(self, items: list[bytes], timings: Timings | None = None
                      ) -> list[tuple[np.ndarray, list[FaceResult]]]:
        """``analyze`` for several images: batched detection and one embedding batch.

        Raises the first image's ``PipelineError`` if any image cannot be decoded.
        """
        with _timed(timings, "decode"):
            images = [self.decode(data) for data in items]
        with _timed(timings, "detect"):
            detections = self.detector.detect_batch(images)
        faces = self._embed_faces(images, detections, timings)
        return list(zip(images, faces))

    def _embed_faces(self, images, detections, timings) -> list[list[FaceResult]]:
        with _timed(timings, "align"):
            crops = [self.align(img, dets) for img, dets in zip(images, detections)]
        total = sum(len(c) for c in crops)
        if total == 0:
            return [[] for _ in images]
        with _timed(timings, "embed"):
            vectors = self.embed(np.concatenate(crops))
        results, offset = [], 0
        for dets in detections:
            results.append([FaceResult(detection=d, embedding=vectors[offset + k])
                            for k, d in enumerate(dets)])
            offset += len(dets)
        return results


def primary_face(detections: list[Detection], shape: tuple[int, ...]) -> int | None:
    """Index of the main subject: the largest face, penalised by its distance from the centre.

    Same ranking as InsightFace's ``max_num`` selection (area - 2 * squared offset).
    None when there is no face.
    """
    if not detections:
        return None
    cy, cx = shape[0] / 2, shape[1] / 2
    values = []
    for det in detections:
        ox = (det.box[0] + det.box[2]) / 2 - cx
        oy = (det.box[1] + det.box[3]) / 2 - cy
        values.append(det.area - 2.0 * (ox * ox + oy * oy))
    return int(np.argmax(values))
