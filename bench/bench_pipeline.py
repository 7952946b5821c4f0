"""Images per second of facegate's pipeline against InsightFace's model_zoo path.

Both run in this process on the same images (InsightFace's group photo, then LFW
and CelebA photos in equal parts) with the same ONNX files from ``../shared/models``:

- ours: ``Pipeline.analyze(bytes)`` (decode, detect, align, embed every face, largest first)
  with SCRFD-2.5G at the image's own size (rounded to 32, at most det_size) and
  the MobileFaceNet peer;
- insightface: ``cv2.imdecode`` + ``model_zoo.SCRFD.detect`` at 640x640 (as
  ``FaceAnalysis`` runs it) + ``ArcFaceONNX.get`` (``norm_crop`` + embedding) per face.

Each round times both paths over all images, alternating which goes first; the
report gives medians over rounds (wall-clock images/s and process CPU ms per
image, the latter less sensitive to other load on the machine) and the ratio of
images/s.  An untimed pass then checks that both give the same answer
(``agreement``): per image, whether both found as many faces; per face found by
both (boxes paired at IoU >= 0.5), the cosine between our embedding and
InsightFace's of that face (median and min).  The last line of output is one
JSON object.

    python bench/bench_pipeline.py [--quick] [--images N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared")).resolve()


def _spread(paths: list[Path], count: int) -> list[Path]:
    step = max(1, len(paths) // max(1, count))
    return paths[::step][:count]


def load_images(count: int) -> list[bytes]:
    """InsightFace's group photo, then LFW and CelebA photos in equal parts, spread evenly."""
    import insightface

    group = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    lfw = sorted((SHARED / "data" / "lfw" / "images").glob("*/*.jpg"))
    celeba = sorted((SHARED / "data" / "celeba" / "images").glob("*/*.jpg"))
    rest = count - 1
    chosen = _spread(lfw, rest - rest // 2) + _spread(celeba, rest // 2)
    return [group.read_bytes(), *(p.read_bytes() for p in chosen)]


def build_ours(detector: str, recognizer: str):
    from service.config import MANIFEST_PATH, Settings
    from service.pipeline.pipeline import Pipeline
    from service.registry import Registry

    settings = Settings(detector=detector, recognizer=recognizer)
    pipeline = Pipeline.from_settings(settings, Registry(MANIFEST_PATH, [SHARED / "models"]))

    def run(data: bytes) -> list[tuple]:
        """(box, L2-normalised embedding) of every face."""
        faces = pipeline.analyze(data, allow_none=True)
        return list(zip([d.box for d in faces.detections], faces.embeddings, strict=True))

    return run


def build_insightface(detector_file: Path, recognizer_file: Path, det_size: int):
    import cv2
    import numpy as np
    from insightface.app.common import Face
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    det = SCRFD(str(detector_file))
    det.prepare(-1, input_size=(det_size, det_size), det_thresh=0.5)
    rec = ArcFaceONNX(str(recognizer_file))
    rec.prepare(-1)

    def run(data: bytes) -> list[tuple]:
        """(box, embedding as ArcFaceONNX returns it, not normalised) of every face."""
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        boxes, kpss = det.detect(img, input_size=(det_size, det_size))
        return [
            (box[:4], rec.get(img, Face(bbox=box[:4], kps=kps, det_score=box[4])))
            for box, kps in zip(boxes, kpss, strict=True)
        ]

    return run


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def agreement(ours, theirs, images: list[bytes]) -> dict:
    """Same faces and same embeddings? Faces paired greedily by IoU (>= 0.5)."""
    import numpy as np

    cosines, equal_counts, unpaired = [], 0, 0
    for data in images:
        mine, other = ours(data), theirs(data)
        equal_counts += len(mine) == len(other)
        pairs = sorted(
            ((_iou(a[0], b[0]), i, j) for i, a in enumerate(mine) for j, b in enumerate(other)),
            reverse=True,
        )
        used_i, used_j = set(), set()
        for iou, i, j in pairs:
            if iou < 0.5 or i in used_i or j in used_j:
                continue
            used_i.add(i), used_j.add(j)
            a, b = mine[i][1], np.asarray(other[j][1], np.float64)
            cosines.append(float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))))
        unpaired += len(mine) - len(used_i) + len(other) - len(used_j)
    return {
        "images_with_equal_face_count": equal_counts,
        "faces_paired": len(cosines),
        "faces_unpaired": unpaired,
        "embedding_cosine_median": round(float(np.median(cosines)), 5) if cosines else None,
        "embedding_cosine_min": round(float(np.min(cosines)), 5) if cosines else None,
    }


def time_path(run, images: list[bytes]) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, faces) for one pass over the images."""
    start, cpu = time.perf_counter(), time.process_time()
    faces = sum(len(run(data)) for data in images)
    return time.perf_counter() - start, time.process_time() - cpu, faces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 images, 2 rounds")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--detector", default="scrfd_2.5g_bnkps")
    parser.add_argument("--recognizer", default="mobilefacenet_peer_128d")
    parser.add_argument("--det-size", type=int, default=640, help="InsightFace detector input side")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 10, 2

    images = load_images(args.images)
    ours = build_ours(args.detector, args.recognizer)
    theirs = build_insightface(
        SHARED / "models" / "scrfd_2.5g_bnkps.onnx",
        SHARED / "models" / f"{args.recognizer}.onnx",
        args.det_size,
    )
    ours(images[0]), theirs(images[0])  # warm-up (lazy sessions, caches)

    ours_s, theirs_s = [], []
    cpu = {"ours": [], "insightface": []}
    faces = {}
    for r in range(args.rounds):
        order = [("ours", ours, ours_s), ("insightface", theirs, theirs_s)]
        for name, run, sink in order if r % 2 == 0 else order[::-1]:
            seconds, cpu_seconds, count = time_path(run, images)
            sink.append(seconds)
            cpu[name].append(cpu_seconds)
            faces[name] = count
        print(
            f"round {r + 1}: ours {len(images) / ours_s[-1]:.2f} img/s, insightface "
            f"{len(images) / theirs_s[-1]:.2f} img/s",
            file=sys.stderr,
        )
    same = agreement(ours, theirs, images)
    print(f"agreement: {same}", file=sys.stderr)
    ours_ips = len(images) / statistics.median(ours_s)
    theirs_ips = len(images) / statistics.median(theirs_s)
    print(
        json.dumps(
            {
                "ours_images_per_s": round(ours_ips, 3),
                "insightface_images_per_s": round(theirs_ips, 3),
                "ratio": round(ours_ips / theirs_ips, 3),
                "ours_faces_per_s": round(faces["ours"] * ours_ips / len(images), 3),
                "insightface_faces_per_s": round(
                    faces["insightface"] * theirs_ips / len(images), 3
                ),
                "ours_cpu_ms_per_image": round(
                    1000 * statistics.median(cpu["ours"]) / len(images), 2
                ),
                "insightface_cpu_ms_per_image": round(
                    1000 * statistics.median(cpu["insightface"]) / len(images), 2
                ),
                "images": len(images),
                "rounds": args.rounds,
                "faces": faces,
                "agreement": same,
                "detector": args.detector,
                "recognizer": args.recognizer,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
