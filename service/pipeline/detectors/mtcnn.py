"""MTCNN face detector (P-Net -> R-Net -> O-Net cascade) on ONNX Runtime.

The model file (written by ``service.convert.mtcnn``) holds the three networks; each
runs as its own session. The cascade follows Zhang et al. (2016) as implemented in
facenet-pytorch, whose weights it uses:

1. an image pyramid (smallest face ``settings.min_face_size``, factor 0.709); P-Net
   slides over every scale, candidates at or above threshold 1 become boxes, NMS
   (IoU 0.5) per scale then (IoU 0.7) across scales, box regression, square-ify;
2. every candidate of every image, cropped (zero-padded where it leaves the image,
   as the original MTCNN; ``extra.crop_border = "clip"`` instead stretches the part
   inside the image, as facenet-pytorch) and resized to 24x24, goes through R-Net in
   one batch; threshold 2, NMS 0.7, regression, square-ify;
3. the survivors, cropped at 48x48, go through O-Net in one batch; threshold 3,
   five landmarks, regression, and a final NMS that divides the overlap by the
   smaller box ("min" mode, 0.7).

Between stages boxes are truncated to the integer pixels that get cropped (as the
original MTCNN; ``extra.truncate_boxes = false`` keeps the fractions, as
facenet-pytorch, whose landmarks then sit ~0.5 px further right on average). With
``crop_border = "clip"`` and ``truncate_boxes = false`` the output equals
facenet-pytorch's ``detect_face``.

Every resize is adaptive average pooling read off one integral image per photo
(the "area" resampling of facenet-pytorch), so crops need no per-box resize call.
Thresholds, pyramid factor, NMS overlaps and the two variant switches come from the
card's ``extra``; images of equal size share P-Net batches in ``detect_batch``. Photos
with a longer side than ``extra.max_side`` (default 1600) are scaled down to it first
and the results scaled back, which bounds time and memory on very large uploads.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnx.utils import Extractor

from ..runtime import select_providers, session_options
from ..types import Detection
from .base import nms

#: The three networks of an MTCNN model file (``service.convert.mtcnn`` writes it): each
#: network's input and its outputs, in the order :meth:`MTCNNDetector.run_network` returns.
NETWORKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pnet": ("pnet_input", ("pnet_reg", "pnet_prob")),
    "rnet": ("rnet_input", ("rnet_reg", "rnet_prob")),
    "onet": ("onet_input", ("onet_reg", "onet_landmarks", "onet_prob")),
}


def split_networks(model: onnx.ModelProto) -> dict[str, bytes]:
    """The serialised stand-alone model of each network in a combined MTCNN model.

    ONNX Runtime wants every graph input fed, so each network runs as its own
    session built from these bytes.
    """
    names = {i.name for i in model.graph.input}
    missing = [inp for inp, _ in NETWORKS.values() if inp not in names]
    if missing:
        raise ValueError(f"not an MTCNN model: inputs {missing} missing")
    extractor = Extractor(model)
    return {
        net: extractor.extract_model([inp], list(outs)).SerializeToString()
        for net, (inp, outs) in NETWORKS.items()
    }


DEFAULT_THRESHOLDS = (0.6, 0.7, 0.7)
DEFAULT_FACTOR = 0.709
DEFAULT_NMS = {"pnet_scale": 0.5, "pnet": 0.7, "rnet": 0.7, "onet_min": 0.7}
PNET_STRIDE = 2
PNET_CELL = 12
RNET_SIZE = 24
ONET_SIZE = 48
#: Photos with a longer side are scaled down to it first (0: never); bounds time and memory.
DEFAULT_MAX_SIDE = 1600
#: Largest number of crops per R-Net / O-Net run (bounds memory on crowded images).
MAX_CROP_BATCH = 1024


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS whose overlap is intersection / smaller area (MTCNN's "Min" mode).

    Areas count pixels inclusively (``x2 - x1 + 1``) as in the original MTCNN; of equal
    scores (O-Net saturates near 1) the later candidate goes first, as there.
    Returns kept indices, highest score first.
    """
    order = np.argsort(scores, kind="stable")[::-1]
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        overlap = (w * h) / np.minimum(area[i], area[rest])
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _nms_per_image(
    boxes: np.ndarray,
    scores: np.ndarray,
    image_idx: np.ndarray,
    threshold: float,
    mode: str = "union",
) -> np.ndarray:
    """NMS applied to each image's candidates separately; kept indices into the inputs."""
    kept = []
    for image in np.unique(image_idx):
        members = np.flatnonzero(image_idx == image)
        if mode == "min":
            local = nms_min(boxes[members], scores[members], threshold)
        else:
            local = nms(boxes[members], scores[members], 0.0, threshold)
        kept.append(members[local])
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def regress(boxes: np.ndarray, reg: np.ndarray, inclusive: bool) -> np.ndarray:
    """Shift box edges by ``reg`` (dx1, dy1, dx2, dy2) in units of the box size."""
    extra = 1.0 if inclusive else 0.0
    w = boxes[:, 2] - boxes[:, 0] + extra
    h = boxes[:, 3] - boxes[:, 1] + extra
    return boxes + reg * np.stack([w, h, w, h], axis=1)


def square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square of its longer side around the same centre."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return np.stack([x1, y1, x1 + side, y1 + side], axis=1)


def _bins(start: np.ndarray, length: np.ndarray, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive-average-pooling bins: (N, out) first and one-past-last input index."""
    i = np.arange(out, dtype=np.int64)
    first = start[:, None] + (i * length[:, None]) // out
    last = start[:, None] - ((-(i + 1) * length[:, None]) // out)
    return first, last


def area_resize(integral: np.ndarray, regions: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize regions of an image by adaptive average pooling, read off its integral image.

    ``integral`` is (H+1, W+1, C) (``cv2.integral``); ``regions`` (N, 4) int rows of
    (row, col, height, width) that may extend past the image, where pixels count as
    zero (MTCNN's zero padding). Output bin ``i`` averages input pixels
    ``floor(i*n/out) .. ceil((i+1)*n/out) - 1`` (the "area" resampling of facenet-pytorch).
    Returns (N, out_h, out_w, C) float32.
    """
    regions = np.asarray(regions, dtype=np.int64).reshape(-1, 4)
    height, width = integral.shape[0] - 1, integral.shape[1] - 1
    r0, r1 = _bins(regions[:, 0], regions[:, 2], out_h)
    c0, c1 = _bins(regions[:, 1], regions[:, 3], out_w)
    inv_area = 1.0 / ((r1 - r0)[:, :, None] * (c1 - c0)[:, None, :])[..., None]
    r0, r1 = np.clip(r0, 0, height), np.clip(r1, 0, height)
    c0, c1 = np.clip(c0, 0, width), np.clip(c1, 0, width)
    # in-place arithmetic: fewer large temporaries (allocation dominates at these sizes)
    if len(regions) == 1:
        # One region (a pyramid level): separable, rows first, then columns.
        rows = np.take(integral, r1[0], axis=0)
        rows -= np.take(integral, r0[0], axis=0)
        sums = np.take(rows, c1[0], axis=1)[None]
        sums -= np.take(rows, c0[0], axis=1)
    else:
        r0, r1 = r0[:, :, None], r1[:, :, None]
        c0, c1 = c0[:, None, :], c1[:, None, :]
        sums = integral[r1, c1]
        sums -= integral[r0, c1]
        sums -= integral[r1, c0]
        sums += integral[r0, c0]
    return (sums * inv_area).astype(np.float32)


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """Scales at which P-Net's 12-pixel window matches faces from ``min_face_size`` up."""
    m = 12.0 / min_face_size
    side = min(height, width) * m
    scales = []
    scale = m
    while side >= 12:
        scales.append(scale)
        scale *= factor
        side *= factor
    return scales


class MTCNNDetector:
    """The ``Detector`` protocol for the ``mtcnn`` family; ``(card, path, settings)``."""

    def __init__(self, card, path, settings):
        self.card = card
        self.path = path
        self.settings = settings
        extra = card.extra or {}
        self.thresholds = tuple(float(t) for t in extra.get("thresholds", DEFAULT_THRESHOLDS))
        if len(self.thresholds) != 3:
            raise ValueError(f"model {card.name!r}: extra.thresholds needs three values")
        self.factor = float(extra.get("factor", DEFAULT_FACTOR))
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"model {card.name!r}: extra.factor must lie in (0, 1)")
        self.nms_overlaps = {**DEFAULT_NMS, **extra.get("nms", {})}
        self.crop_border = str(extra.get("crop_border", "pad"))
        if self.crop_border not in ("pad", "clip"):
            raise ValueError(f"model {card.name!r}: extra.crop_border must be 'pad' or 'clip'")
        self.truncate = bool(extra.get("truncate_boxes", True))
        self.max_side = int(extra.get("max_side", DEFAULT_MAX_SIDE))
        self.min_face_size = max(1.0, float(settings.min_face_size))
        self.score_threshold = float(settings.det_threshold)
        self.max_faces = int(settings.max_faces)
        pre = card.preprocessing
        self.rgb = pre.color == "RGB"
        self.mean = np.asarray(pre.mean, dtype=np.float32)
        self.scale = 1.0 / np.asarray(pre.std, dtype=np.float32)
        model = onnx.load_model_from_string(Path(path).read_bytes())
        # The cascade makes many short runs; threads that spin between them burn CPU time
        # for no gain in throughput (bench/bench_mtcnn.py, BENCHMARKS.md), so they sleep.
        options = session_options(settings, spinning=False)
        providers = select_providers(list(settings.providers))
        self.sessions = {
            net: ort.InferenceSession(blob, sess_options=options, providers=providers)
            for net, blob in split_networks(model).items()
        }
        self._warm_up()

    # -- networks --------------------------------------------------------------------
    def run_network(self, net: str, batch: np.ndarray) -> list[np.ndarray]:
        """Raw outputs of ``net`` (pnet, rnet, onet) for a normalised NCHW float32 batch,
        in the order listed in ``NETWORKS``."""
        input_name, outputs = NETWORKS[net]
        return self.sessions[net].run(
            list(outputs), {input_name: np.ascontiguousarray(batch, np.float32)}
        )

    def _warm_up(self) -> None:
        self.run_network("pnet", np.zeros((1, 3, 24, 24), np.float32))
        self.run_network("rnet", np.zeros((1, 3, RNET_SIZE, RNET_SIZE), np.float32))
        self.run_network("onet", np.zeros((1, 3, ONET_SIZE, ONET_SIZE), np.float32))

    # -- preprocessing -------------------------------------------------------------------
    def integral(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 BGR (or (H, W) grey) -> its (H+1, W+1, 3) integral image
        in the card's colour order; every resize of the cascade is read off it."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise TypeError("MTCNN expects a uint8 numpy image")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"MTCNN expects an (H, W, 3) image, got shape {image.shape}")
        if self.rgb:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if self._shrink(image) < 1.0:
            image = cv2.resize(image, self._work_size(image), interpolation=cv2.INTER_AREA)
        # int32 sums are exact while 255 * H * W fits; float64 (exact to 2**53) beyond
        exact_int32 = 255 * image.shape[0] * image.shape[1] < 2**31
        return cv2.integral(image, sdepth=cv2.CV_32S if exact_int32 else cv2.CV_64F)

    def _shrink(self, image: np.ndarray) -> float:
        """Scale applied before detection: 1, or ``max_side`` / longest side when larger."""
        longest = max(image.shape[:2])
        return self.max_side / longest if 0 < self.max_side < longest else 1.0

    def _work_size(self, image: np.ndarray) -> tuple[int, int]:
        """(width, height) the photo is detected at."""
        shrink = self._shrink(image)
        h, w = image.shape[:2]
        return max(1, round(w * shrink)), max(1, round(h * shrink))

    def _resized(
        self, integral: np.ndarray, regions: np.ndarray, out_h: int, out_w: int
    ) -> np.ndarray:
        """Normalised NHWC float32 crops of ``regions`` (N, 4: row, col, height, width)."""
        pooled = area_resize(integral, regions, out_h, out_w)
        return (pooled - self.mean) * self.scale

    # -- stage 1: P-Net over the pyramid ---------------------------------------------------
    def _proposals(self, group: list[np.ndarray]) -> list[np.ndarray]:
        """P-Net candidates for images of one size (given as integral images): per image,
        (N, 5) rows of a square, regressed box and its score."""
        height, width = group[0].shape[0] - 1, group[0].shape[1] - 1
        whole = np.array([[0, 0, height, width]])
        threshold = self.thresholds[0]
        per_image: list[list[np.ndarray]] = [[] for _ in group]
        for scale in pyramid_scales(height, width, self.min_face_size, self.factor):
            out_h, out_w = int(height * scale + 1), int(width * scale + 1)
            batch = np.concatenate(
                [self._resized(integral, whole, out_h, out_w) for integral in group]
            ).transpose(0, 3, 1, 2)
            reg, prob = self.run_network("pnet", batch)
            b, ys, xs = np.nonzero(prob[:, 1] >= threshold)
            if b.size == 0:
                continue
            scores = prob[b, 1, ys, xs]
            offsets = reg[b, :, ys, xs]
            cells = np.stack([xs, ys], axis=1).astype(np.float32)
            top_left = np.floor((PNET_STRIDE * cells + 1) / np.float32(scale))
            bottom_right = np.floor((PNET_STRIDE * cells + PNET_CELL) / np.float32(scale))
            cand = np.concatenate([top_left, bottom_right, scores[:, None], offsets], axis=1)
            keep = _nms_per_image(cand[:, :4], cand[:, 4], b, self.nms_overlaps["pnet_scale"])
            for k in keep:
                per_image[b[k]].append(cand[k])
        results = []
        for rows in per_image:
            if not rows:
                results.append(np.zeros((0, 5), np.float32))
                continue
            cand = np.stack(rows)
            keep = nms(cand[:, :4], cand[:, 4], 0.0, self.nms_overlaps["pnet"])
            cand = cand[keep]
            boxes = square(regress(cand[:, :4], cand[:, 5:9], inclusive=False))
            results.append(np.concatenate([boxes, cand[:, 4:5]], axis=1))
        return results

    # -- crops for R-Net / O-Net ------------------------------------------------------------
    def _regions(self, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
        """Float boxes (1-based, inclusive, as MTCNN keeps them) -> (row, col, height, width).

        ``pad`` keeps the whole box (zeros outside the image, as the original MTCNN);
        ``clip`` keeps only its part inside the image, stretched to the square crop
        (as facenet-pytorch).
        """
        x1, y1, x2, y2 = np.trunc(boxes).astype(np.int64).T
        if self.crop_border == "clip":
            x1, y1 = np.maximum(x1, 1), np.maximum(y1, 1)
            x2, y2 = np.minimum(x2, width), np.minimum(y2, height)
        return np.stack([y1 - 1, x1 - 1, y2 - y1 + 1, x2 - x1 + 1], axis=1)

    def _valid(self, images: list[np.ndarray], boxes: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Mask of boxes that are non-empty and overlap their image."""
        t = np.trunc(boxes)
        heights = np.array([images[i].shape[0] - 1 for i in idx])
        widths = np.array([images[i].shape[1] - 1 for i in idx])
        return (
            (t[:, 2] >= t[:, 0])
            & (t[:, 3] >= t[:, 1])
            & (t[:, 2] >= 1)
            & (t[:, 3] >= 1)
            & (t[:, 0] <= widths)
            & (t[:, 1] <= heights)
            & np.all(np.isfinite(boxes), axis=1)
        )

    def _run_crops(
        self, net: str, images: list[np.ndarray], boxes: np.ndarray, idx: np.ndarray, size: int
    ) -> list[np.ndarray]:
        """Run ``net`` on the ``size`` x ``size`` crops of all boxes, batched across images."""
        crops = np.empty((len(boxes), size, size, 3), np.float32)
        for image in np.unique(idx):
            members = np.flatnonzero(idx == image)
            height, width = images[image].shape[0] - 1, images[image].shape[1] - 1
            regions = self._regions(boxes[members], height, width)
            crops[members] = self._resized(images[image], regions, size, size)
        batch = crops.transpose(0, 3, 1, 2)
        outputs = [
            self.run_network(net, batch[start : start + MAX_CROP_BATCH])
            for start in range(0, len(batch), MAX_CROP_BATCH)
        ]
        return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]

    # -- the cascade ---------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in one (H, W, 3) uint8 BGR image, highest score first."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """Faces in each image, highest score first; R-Net and O-Net see every candidate of
        every image in one batch."""
        if not images:
            return []
        integrals = [self.integral(image) for image in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, integral in enumerate(integrals):
            groups.setdefault(integral.shape[:2], []).append(i)
        proposals: list[np.ndarray] = [np.zeros((0, 5), np.float32)] * len(images)
        for members in groups.values():
            for i, cand in zip(
                members, self._proposals([integrals[i] for i in members]), strict=True
            ):
                proposals[i] = cand
        idx = np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(proposals)])
        cand = np.concatenate(proposals).astype(np.float32)
        boxes, scores, landmarks, idx = self._refine_and_output(integrals, cand, idx)
        # back to the original pixels of shrunk photos (pixel centres map onto pixel centres)
        grow = np.array(
            [
                image.shape[1] / (integral.shape[1] - 1)
                for image, integral in zip(images, integrals, strict=True)
            ],
            np.float32,
        )[idx]
        boxes = (boxes + 0.5) * grow[:, None] - 0.5
        landmarks = (landmarks + 0.5) * grow[:, None, None] - 0.5
        return self._detections(len(images), boxes, scores, landmarks, idx)

    def _refine_and_output(self, images, cand, idx):
        empty = (
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            np.zeros((0, 5, 2), np.float32),
            np.zeros(0, np.int64),
        )
        # Boxes are truncated to the integer pixels that are cropped before each stage, as
        # the original MTCNN does, so that the regression and the landmarks (relative to the
        # crop) land where the network saw them; facenet-pytorch keeps the fractions and
        # shifts landmarks ~0.5 px right/down on average (a mirrored photo shows it).
        cand[:, :4] = np.trunc(cand[:, :4]) if self.truncate else cand[:, :4]
        # stage 2: R-Net
        valid = self._valid(images, cand[:, :4], idx)
        cand, idx = cand[valid], idx[valid]
        if len(cand) == 0:
            return empty
        reg, prob = self._run_crops("rnet", images, cand[:, :4], idx, RNET_SIZE)
        passed = prob[:, 1] > self.thresholds[1]
        boxes, scores, reg, idx = cand[passed, :4], prob[passed, 1], reg[passed], idx[passed]
        keep = _nms_per_image(boxes, scores, idx, self.nms_overlaps["rnet"])
        boxes = square(regress(boxes[keep], reg[keep], inclusive=True))
        idx = idx[keep]
        # stage 3: O-Net
        boxes = np.trunc(boxes) if self.truncate else boxes
        valid = self._valid(images, boxes, idx)
        boxes, idx = boxes[valid], idx[valid]
        if len(boxes) == 0:
            return empty
        reg, points, prob = self._run_crops("onet", images, boxes, idx, ONET_SIZE)
        passed = prob[:, 1] > self.thresholds[2]
        boxes, scores, reg, points, idx = (
            boxes[passed],
            prob[passed, 1],
            reg[passed],
            points[passed],
            idx[passed],
        )
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        landmarks = np.stack(
            [w * points[:, :5] + boxes[:, :1] - 1, h * points[:, 5:] + boxes[:, 1:2] - 1], axis=2
        )
        boxes = regress(boxes, reg, inclusive=True)
        keep = _nms_per_image(boxes, scores, idx, self.nms_overlaps["onet_min"], mode="min")
        return boxes[keep], scores[keep], landmarks[keep], idx[keep]

    def _detections(self, count, boxes, scores, landmarks, idx) -> list[list[Detection]]:
        results: list[list[Detection]] = [[] for _ in range(count)]
        for k in np.argsort(-scores, kind="stable"):
            if scores[k] < self.score_threshold or len(results[idx[k]]) >= self.max_faces:
                continue
            results[idx[k]].append(
                Detection(
                    box=boxes[k].astype(np.float32),
                    score=float(scores[k]),
                    landmarks=landmarks[k].astype(np.float32),
                )
            )
        return results
