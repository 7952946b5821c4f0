"""The face pipeline: bytes -> decode -> detect -> choose faces -> align -> embed.

``Pipeline.from_settings`` resolves the detector and recognizer (manifest names or
``.onnx`` paths, sha256-verified by the registry), builds and warms both up. All
methods are safe to call from several threads at once (ONNX Runtime sessions are).

Every front end analyses images through the same two calls: :meth:`Pipeline.locate`
(decode, detect, keep the faces a :data:`~service.pipeline.faces.Policy` asks for, align)
and :meth:`Pipeline.embed_faces` (one embedding call for the faces of one or several
images), or :meth:`Pipeline.analyze`, both at once.  Which face is the main one, and the
other policies, live in :mod:`service.pipeline.faces`.  The embedder is whatever object
was given: the ONNX model, or in the service the micro-batcher wrapping it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from service.registry import (
    ARCFACE_TEMPLATE_112,
    ModelCard,
    Registry,
    default_registry,
    select_recognizer,
)

from .align import align_faces
from .decode import MemoryBudget, decode_cost, decode_opened, read_header
from .detectors import build_detector
from .embed import OnnxEmbedder, card_flip
from .errors import PipelineError
from .faces import Faces, Policy, QualityFloor, select_faces
from .types import Detection, Detector, Embedder, Timings

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger(__name__)

#: An image as bytes (decoded here, within the settings' limits) or already decoded (BGR).
Source = bytes | np.ndarray


@contextmanager
def _timed(timings: Timings | None, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings.add(stage, time.perf_counter() - start)


class Pipeline:
    """A detector and an embedder plus the decode/choose/align glue between them.

    ``embedder`` may be None for a pipeline that only locates and aligns faces (then
    ``template`` and ``crop_size`` say where to, e.g. for ``facegate-train prepare``).
    """

    def __init__(
        self,
        detector: Detector,
        embedder: Embedder | None,
        settings: Settings,
        detector_card: ModelCard | None = None,
        recognizer_card: ModelCard | None = None,
        recognizer_selection: str = "configured",
        *,
        template: np.ndarray | None = None,
        crop_size: tuple[int, int] | None = None,
        decode_budget: MemoryBudget | None = None,
    ) -> None:
        self.detector = detector
        self.embedder = embedder
        self.settings = settings
        self.detector_card = detector_card if detector_card is not None else detector.card
        if recognizer_card is None and embedder is not None:
            recognizer_card = embedder.card
        self._recognizer_card = recognizer_card
        #: How the recognizer was chosen (:func:`service.registry.select_recognizer`):
        #: ``configured``, ``default`` or ``fallback``.
        self.recognizer_selection = recognizer_selection
        alignment = recognizer_card.alignment if recognizer_card is not None else None
        if template is not None:
            self.template = np.asarray(template, dtype=np.float32)
        else:
            self.template = np.asarray(
                alignment.template if alignment else ARCFACE_TEMPLATE_112, dtype=np.float32
            )
        if crop_size is not None:
            self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        else:
            size = alignment.size if alignment else (112, 112)
            self.crop_size = (int(size[0]), int(size[1]))
        #: The enrolment quality floor (policy ``enrol``).
        self.floor = QualityFloor(
            float(settings.enroll_min_face_size), float(settings.enroll_min_det_score)
        )
        #: Bytes of decoded images in flight (``settings.decode_budget_bytes``), shared
        #: with the pipelines :meth:`with_embedder` derives from this one.
        self.decode_budget = decode_budget or MemoryBudget(settings.decode_budget_bytes)

    @classmethod
    def from_settings(
        cls, settings: Settings, registry: Registry | None = None, flip: bool | None = None
    ) -> Pipeline:
        """Resolve, verify, build and warm up the configured detector and recognizer."""
        registry = registry or default_registry(settings)
        det_card, det_path = registry.resolve(settings.detector, task="detection")
        rec_ref, selection = select_recognizer(settings.recognizer, registry)
        if selection == "fallback":
            log.warning(
                "FACEGATE_RECOGNIZER is unset and the default recognizer is not "
                "installed; serving its installed fallback %s",
                rec_ref,
            )
        rec_card, rec_path = registry.resolve(rec_ref, task="recognition")
        detector = build_detector(det_card, det_path, settings)
        embedder = OnnxEmbedder(rec_card, rec_path, settings, flip=flip)
        calibration = rec_card.calibration
        if calibration is None and embedder.flip != card_flip(rec_card):
            log.warning(
                "%s's card thresholds were calibrated with flip %s; serving flip %s "
                "(FACEGATE_FLIP_AUGMENT): they may not hold (`facegate models calibrate`)",
                rec_card.name,
                card_flip(rec_card),
                embedder.flip,
            )
        if calibration is not None and (
            calibration.flip != embedder.flip or calibration.detector != det_card.id
        ):
            log.warning(
                "the deployment calibration of %s was made with detector %s, flip %s; "
                "serving detector %s, flip %s: its thresholds may not hold",
                rec_card.name,
                calibration.detector,
                calibration.flip,
                det_card.id,
                embedder.flip,
            )
        return cls(detector, embedder, settings, det_card, rec_card, selection)

    def with_embedder(self, embedder: Embedder) -> Pipeline:
        """The same pipeline embedding through ``embedder`` (e.g. the micro-batcher)."""
        return Pipeline(
            self.detector,
            embedder,
            self.settings,
            self.detector_card,
            self._recognizer_card,
            self.recognizer_selection,
            template=self.template,
            crop_size=self.crop_size,
            decode_budget=self.decode_budget,
        )

    @property
    def recognizer_card(self) -> ModelCard:
        if self._recognizer_card is None:
            raise RuntimeError("this pipeline only locates faces: it has no recognizer")
        return self._recognizer_card

    @property
    def model_id(self) -> str:
        """The id embeddings of this pipeline are tagged with."""
        return self._embedder().model_id

    @property
    def dim(self) -> int:
        return int(self._embedder().dim)

    def _embedder(self) -> Embedder:
        if self.embedder is None:
            raise RuntimeError("this pipeline only locates faces: it has no recognizer")
        return self.embedder

    # -- stages ----------------------------------------------------------------------
    def decode(self, data: bytes) -> np.ndarray:
        with self.decoded(data) as image:
            return image

    @contextmanager
    def decoded(self, data: bytes, timings: Timings | None = None) -> Iterator[np.ndarray]:
        """The decoded image, its estimated memory (:func:`decode_cost`) held from the
        decode budget until the block ends: waits while other decodes fill the budget."""
        settings = self.settings
        img = read_header(
            data, settings.max_image_bytes, settings.max_image_pixels, settings.max_decode_bytes
        )
        with self.decode_budget.reserve(decode_cost(img)):
            with _timed(timings, "decode"):
                image = decode_opened(img)
            yield image

    def detect(self, image: np.ndarray) -> list[Detection]:
        return self.detector.detect(image)

    def align(self, image: np.ndarray, detections: list[Detection]) -> np.ndarray:
        return align_faces(image, [d.landmarks for d in detections], self.template, self.crop_size)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, h, w, 3) aligned crops -> (N, dim) L2-normalised embeddings."""
        return self._embedder().embed(crops)

    # -- the analysis path ---------------------------------------------------------------
    def locate(
        self,
        source: Source,
        policy: Policy = "all",
        timings: Timings | None = None,
        *,
        allow_none: bool = False,
        limit: int | None = None,
    ) -> Faces:
        """Decode (bytes), detect, keep the faces ``policy`` asks for and align them.

        Raises ``PipelineError`` for an image that cannot be decoded or a policy refusal
        (no face unless ``allow_none``, several faces, a face under the enrolment floor).
        """
        if isinstance(source, bytes):
            # the decoded image's memory stays reserved from the decode budget until the
            # faces are aligned and the image can go
            with self.decoded(source, timings) as image:
                with _timed(timings, "detect"):
                    detections = self.detect(image)
                return self._choose(image, detections, policy, timings, allow_none, limit)
        with _timed(timings, "detect"):
            detections = self.detect(source)
        return self._choose(source, detections, policy, timings, allow_none, limit)

    def locate_batch(
        self,
        sources: Sequence[Source],
        policy: Policy = "all",
        timings: Timings | None = None,
        *,
        allow_none: bool = False,
        limit: int | None = None,
    ) -> list[Faces | PipelineError]:
        """:meth:`locate` for several images, with one batched detection call; each
        image's result, or the ``PipelineError`` that refused it, in order. Each decode
        takes its memory from the decode budget only while it decodes (holding a whole
        batch's reservations at once could wait on itself)."""
        results: list[Faces | PipelineError | None] = []
        images: list[np.ndarray] = []
        with _timed(timings, "decode"):
            for source in sources:
                try:
                    images.append(self.decode(source) if isinstance(source, bytes) else source)
                    results.append(None)
                except PipelineError as exc:
                    results.append(exc)
        with _timed(timings, "detect"):
            found = iter(self.detector.detect_batch(images) if images else [])
        pixels = iter(images)
        for k, result in enumerate(results):
            if result is not None:
                continue
            try:
                results[k] = self._choose(
                    next(pixels), next(found), policy, timings, allow_none, limit
                )
            except PipelineError as exc:
                results[k] = exc
        return [r for r in results if r is not None]

    def _choose(
        self,
        image: np.ndarray,
        detections: list[Detection],
        policy: Policy,
        timings: Timings | None,
        allow_none: bool,
        limit: int | None,
    ) -> Faces:
        kept = select_faces(
            detections, policy, floor=self.floor, allow_none=allow_none, limit=limit
        )
        with _timed(timings, "align"):
            crops = np.asarray(self.align(image, kept))
        return Faces(kept, crops, (int(image.shape[1]), int(image.shape[0])), len(detections))

    def embed_faces(self, found: Faces | Sequence[Faces], timings: Timings | None = None) -> None:
        """Embed the kept faces of one or several images in one embedder call (sets each
        ``Faces.embeddings``)."""
        items = [found] if isinstance(found, Faces) else list(found)
        crops = [f.crops for f in items if len(f.detections)]
        if crops:
            with _timed(timings, "embed"):
                vectors = self.embed(np.concatenate(crops))
        offset = 0
        for faces in items:
            n = len(faces.detections)
            if n:
                faces.embeddings = np.asarray(vectors[offset : offset + n], dtype=np.float32)
            else:
                faces.embeddings = np.zeros((0, self.dim), dtype=np.float32)
            offset += n

    def analyze(
        self,
        source: Source,
        policy: Policy = "all",
        timings: Timings | None = None,
        *,
        allow_none: bool = False,
        limit: int | None = None,
    ) -> Faces:
        """:meth:`locate` then :meth:`embed_faces`: the kept faces with their embeddings."""
        faces = self.locate(source, policy, timings, allow_none=allow_none, limit=limit)
        self.embed_faces(faces, timings)
        return faces
