"""What every ONNX face detector shares: input sizing, letterbox, blob, NMS, filtering.

A concrete detector only says how to decode its raw outputs for one image of a
batch (``decode``) into boxes, scores and five landmarks in network-input
pixels; everything else is here, implemented once.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from ..runtime import create_session, warm_up
from ..types import Detection

#: Dynamic-input detectors use sides that are multiples of this (the largest stride).
SIZE_DIVISOR = 32


@lru_cache(maxsize=64)
def grid_centers(rows: int, cols: int, stride: int, per_cell: int = 1) -> np.ndarray:
    """(rows*cols*per_cell, 2) float32 top-left corners (x, y) of the cells, in input pixels.

    Row-major over the feature map, each cell repeated ``per_cell`` times
    (anchors of one cell are contiguous). Read-only: it is cached.
    """
    ys, xs = np.mgrid[:rows, :cols]
    centers = (np.stack([xs, ys], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
    if per_cell > 1:
        centers = np.repeat(centers, per_cell, axis=0)
    centers.setflags(write=False)
    return centers


def round_up(value: float, divisor: int = SIZE_DIVISOR) -> int:
    return max(divisor, int(np.ceil(value / divisor)) * divisor)


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect ratio into the top-left of a zero canvas of ``size`` (w, h).

    Returns the canvas and the scale (input pixels per image pixel).
    """
    width, height = size
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    new_w = min(width, max(1, int(round(w * scale))))
    new_h = min(height, max(1, int(round(h * scale))))
    if (new_w, new_h) == (w, h):
        resized = image
    else:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
    if (new_w, new_h) == (width, height):
        return np.ascontiguousarray(resized), scale
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return canvas, scale


def nms(
    boxes: np.ndarray, scores: np.ndarray, score_threshold: float, iou_threshold: float
) -> np.ndarray:
    """Indices kept by OpenCV's NMS, highest score first."""
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    keep = cv2.dnn.NMSBoxes(
        xywh.tolist(), scores.astype(float).tolist(), float(score_threshold), float(iou_threshold)
    )
    kept = np.asarray(keep, dtype=np.int64).reshape(-1)
    return kept[np.argsort(-scores[kept], kind="stable")]


class OnnxDetector:
    """Base class of the ONNX detectors; constructor signature ``(card, path, settings)``."""

    #: input side when the model's spatial dims are dynamic and no size rule applies
    default_side = 640

    def __init__(self, card, path, settings):
        self.card = card
        self.path = path
        self.settings = settings
        self.session = create_session(path, settings)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        shape = inp.shape
        static = [isinstance(d, int) and d > 0 for d in shape]
        self.fixed_size: tuple[int, int] | None = (
            (int(shape[3]), int(shape[2])) if static[2] and static[3] else None
        )
        self.dynamic_batch = not static[0]
        pre = card.preprocessing
        self.swap_rb = pre.color == "RGB"
        self.mean = tuple(float(m) for m in pre.mean)
        self.std = tuple(float(s) for s in pre.std)
        self.det_size = int(settings.det_size)
        self.score_threshold = float(settings.det_threshold)
        self.nms_threshold = float(settings.nms_threshold)
        self.min_face_size = float(settings.min_face_size)
        self.max_faces = int(settings.max_faces)
        self._setup()
        warm_up(self.session, dynamic_side=self.default_side)

    # -- hooks for subclasses ------------------------------------------------------
    def _setup(self) -> None:
        """Model-specific initialisation (output layout checks)."""

    def decode(
        self, outputs: list[np.ndarray], index: int, input_size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw outputs of image ``index`` -> boxes (N,4), scores (N,), landmarks (N,5,2).

        Coordinates in network-input pixels; only candidates at or above the score
        threshold need be returned.
        """
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------
    def use_fixed_input(self, size: tuple[int, int]) -> None:
        """Letterbox every image to ``size`` (w, h) instead of choosing a size per image.

        For dynamic models only (a fixed export already has one size); used to
        reproduce InsightFace's ``FaceAnalysis`` setting (640x640) for comparisons.
        """
        if any(side % SIZE_DIVISOR for side in size):
            raise ValueError(f"input sides must be multiples of {SIZE_DIVISOR}: {size}")
        if self.fixed_size is not None and tuple(size) != self.fixed_size:
            raise ValueError(f"{self.card.name} only accepts {self.fixed_size}")
        self.fixed_size = (int(size[0]), int(size[1]))

    def input_size_for(self, image: np.ndarray) -> tuple[int, int]:
        """(w, h) network input for an image.

        Fixed-size models use their size. Dynamic models keep the image's aspect
        ratio: scaled down so that the longest side is at most ``det_size``, each
        side rounded up to a multiple of 32 (a 250x250 photo runs at 256x256).
        """
        if self.fixed_size is not None:
            return self.fixed_size
        h, w = image.shape[:2]
        scale = min(1.0, self.det_size / max(h, w))
        return round_up(w * scale), round_up(h * scale)

    def blob(self, images: list[np.ndarray]) -> np.ndarray:
        """Letterboxed uint8 images of one size -> NCHW float32, colour order and mean/std of
        the card."""
        if len(set(self.std)) == 1:  # size (0, 0): the images' own size
            return cv2.dnn.blobFromImages(
                images, 1.0 / self.std[0], (0, 0), self.mean, swapRB=self.swap_rb, crop=False
            )
        batch: np.ndarray = np.stack(images).astype(np.float32)
        if self.swap_rb:
            batch = batch[..., ::-1]
        batch = (batch - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))

    def _run(
        self, canvases: list[np.ndarray], input_size: tuple[int, int]
    ) -> list[list[np.ndarray]]:
        """Per-image raw outputs; one batched run when the model allows it."""
        if self.dynamic_batch and len(canvases) > 1:
            outputs = self.session.run(self.output_names, {self.input_name: self.blob(canvases)})
            return [[o[i : i + 1] for o in outputs] for i in range(len(canvases))]
        return [
            self.session.run(self.output_names, {self.input_name: self.blob([c])}) for c in canvases
        ]

    def postprocess(
        self, boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray, scale: float
    ) -> list[Detection]:
        """Input pixels -> image pixels, NMS, size filter, ``max_faces``, sorted by score."""
        if len(scores) == 0:
            return []
        boxes = boxes / scale
        landmarks = landmarks / scale
        keep = nms(boxes, scores, self.score_threshold, self.nms_threshold)
        result = []
        for i in keep:
            box = boxes[i]
            if min(box[2] - box[0], box[3] - box[1]) < self.min_face_size:
                continue
            result.append(
                Detection(
                    box=box.astype(np.float32),
                    score=float(scores[i]),
                    landmarks=landmarks[i].astype(np.float32),
                )
            )
            if len(result) >= self.max_faces:
                break
        return result

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in one (H, W, 3) uint8 BGR image, highest score first."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """Faces in each image; images sharing an input size run as one batch where possible."""
        results: list[list[Detection]] = [[] for _ in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(self.input_size_for(image), []).append(i)
        for input_size, members in groups.items():
            boxed = [letterbox(images[i], input_size) for i in members]
            raw = self._run([c for c, _ in boxed], input_size)
            for j, i in enumerate(members):
                boxes, scores, landmarks = self.decode(raw[j], 0, input_size)
                results[i] = self.postprocess(boxes, scores, landmarks, boxed[j][1])
        return results
