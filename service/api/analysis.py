"""Per-request face analysis for the routes: pipeline stages off the event loop, batched embedding.

Decoding, detection and alignment run in worker threads, at most
``settings.pipeline_threads`` images at a time (``AppState.cpu_limiter``; by
default the thread pool's own bound); embedding goes through
the app's :class:`~service.batching.MicroBatcher` so that concurrent requests'
faces share one model call.  Stage times are collected per request (reported
with ``?timings=true``) and fed to the stage histograms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import anyio.to_thread
import cv2
import numpy as np
from starlette.concurrency import run_in_threadpool

from service.gallery.errors import GalleryModelMismatch
from service.pipeline.errors import FaceTooSmall, LowQualityFace, MultipleFaces, NoFace
from service.pipeline.types import Detection, Timings

from .deps import AppState

Policy = Literal["largest", "refuse", "all", "enrol"]


@dataclass
class Analysis:
    """The faces kept from one image, with their embeddings and aligned crops."""

    detections: list[Detection]
    embeddings: np.ndarray  # (n, dim) float32, L2-normalised
    crops: np.ndarray  # (n, h, w, 3) uint8
    image_size: tuple[int, int]  # (width, height)


def select_faces(detections: list[Detection], policy: Policy, *, min_size: int = 0,
                 min_score: float = 0.0, allow_none: bool = False,
                 limit: int | None = None) -> list[Detection]:
    """Apply a several-faces policy; ``enrol`` also enforces the enrolment quality floor.

    No face is a ``NoFace`` error unless ``allow_none`` (then no face is kept); ``all``
    keeps every face, largest first, at most ``limit`` of them.
    """
    if not detections:
        if allow_none:
            return []
        raise NoFace("no face was found in the image")
    if policy == "all":
        return sorted(detections, key=lambda d: d.area, reverse=True)[:limit]
    if policy in ("refuse", "enrol") and len(detections) > 1:
        raise MultipleFaces(f"{len(detections)} faces were found; exactly one is required")
    face = max(detections, key=lambda d: d.area)
    if policy == "enrol":
        size = min(face.width, face.height)
        if size < min_size:
            raise FaceTooSmall(
                f"the face is {size:.0f} px; enrolment needs at least {min_size} px")
        if face.score < min_score:
            raise LowQualityFace(
                f"the face's detection score {face.score:.3f} is under the enrolment minimum "
                f"{min_score}")
    return [face]


def face_quality(detection: Detection, crop: np.ndarray) -> dict:
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


def _timed(timings: Timings, stage: str, fn, *args):
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        timings.add(stage, time.perf_counter() - start)


def _locate(state: AppState, data: bytes, policy: Policy, timings: Timings,
            allow_none: bool = False, limit: int | None = None):
    """decode -> detect -> select -> align (runs in a worker thread)."""
    pipeline, settings = state.pipeline, state.settings
    with pipeline.decoded(data, timings) as image:  # memory held until aligned
        detections = _timed(timings, "detect", pipeline.detect, image)
        state.metrics.faces_per_image.observe(len(detections))
        kept = select_faces(detections, policy, min_size=settings.enroll_min_face_size,
                            min_score=settings.enroll_min_det_score, allow_none=allow_none,
                            limit=limit)
        crops = _timed(timings, "align", pipeline.align, image, kept)
        return kept, np.asarray(crops), (int(image.shape[1]), int(image.shape[0]))


async def locate(state: AppState, data: bytes, policy: Policy, timings: Timings, *,
                 allow_none: bool = False, limit: int | None = None) -> Analysis:
    """Find and align the faces of one image under ``policy``, without embedding them
    (``embeddings`` is then empty)."""
    detections, crops, size = await anyio.to_thread.run_sync(
        _locate, state, data, policy, timings, allow_none, limit, limiter=state.cpu_limiter)
    empty = np.zeros((0, int(state.pipeline.embedder.dim)), dtype=np.float32)
    return Analysis(detections, empty, crops, size)


async def analyze(state: AppState, data: bytes, policy: Policy, timings: Timings, *,
                  allow_none: bool = False, limit: int | None = None) -> Analysis:
    """Find the faces of one image under ``policy`` and embed them (micro-batched)."""
    found = await locate(state, data, policy, timings, allow_none=allow_none, limit=limit)
    if not found.detections:
        return found
    start = time.perf_counter()
    embeddings = await state.batcher.embed(found.crops)
    timings.add("embed", time.perf_counter() - start)
    found.embeddings = np.asarray(embeddings, dtype=np.float32)
    return found


def describe_faces(found: Analysis) -> list[dict]:
    """Every kept face as box, score, landmarks and its :func:`face_quality` figures."""
    return [{**detection.to_dict(), "quality": face_quality(detection, crop)}
            for detection, crop in zip(found.detections, found.crops)]


async def call(timings: Timings, stage: str, fn, *args):
    """Run a blocking call (gallery work) in the thread pool, timing it as ``stage``."""
    start = time.perf_counter()
    try:
        return await run_in_threadpool(fn, *args)
    finally:
        timings.add(stage, time.perf_counter() - start)


async def gallery_for_model(state: AppState, name: str, timings: Timings) -> dict:
    """The gallery's info; 404 if unknown, 409 if it holds another model's embeddings."""
    info = await call(timings, "search", state.gallery.get_gallery, name)
    model_id = info.get("model_id")
    if model_id is not None and model_id != state.model_id:
        raise GalleryModelMismatch(name, model_id, state.model_id)
    return info


def timings_ms(timings: Timings) -> dict[str, float]:
    return {stage: round(seconds * 1000.0, 3) for stage, seconds in timings.stages.items()}
