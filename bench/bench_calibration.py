"""Calibration and flip-augmentation figures on the shared CelebA and LFW (BENCHMARKS.md).

Sub-commands (each prints one JSON line):

``flip``
    The default stack (``--detector`` + ``--recognizer``) with and without the mirrored-face
    embedding (``FACEGATE_FLIP_AUGMENT``), on the very same aligned chips: CelebA rank-1 (per
    identity the first photo, by file name, with a face is enrolled, every other one is a
    probe; cosine, exact search), CelebA TMR at FMR 1e-3 (every same-identity pair against
    every different-identity pair, :mod:`service.pipeline.calibration`), LFW 10-fold accuracy
    and TMR at FMR 1e-3 (``facegate eval-pairs``' protocol) and the embedding's CPU cost
    (process CPU seconds and wall seconds per face, both variants in the same run).
``calibration``
    ``facegate models calibrate NAME --photos ../shared/data/celeba/images --no-write`` in a
    subprocess for every ``--recognizer`` (each with its detector, ``NAME=DETECTOR``): its
    thresholds, wall time and peak memory (the child's maximum resident set), then the FMR
    those thresholds give on LFW's impostor pairs (every pair of the 7,701 ``pairs.txt``
    images of two different people, counted exactly) and the FMR an LFW calibration itself
    gives there.
``pairs-speed``
    The pair stage alone (:func:`~service.pipeline.calibration.tally` and the bootstrap) on
    ``--photos`` random unit vectors of ``--dim`` dimensions in persons of 10 photos: time and
    peak traced memory.

Aligned chips are cached in ``--cache`` (CelebA: one ``.npz`` per detector and crop contract;
LFW: eval-pairs' chip files), so a second run only embeds.

    python bench/bench_calibration.py flip --models-dir ~/.cache/facegate/test-models
    python bench/bench_calibration.py calibration --models-dir ~/.cache/facegate/test-models \\
        --recognizer dlib_resnet_v1=mtcnn
    python bench/bench_calibration.py calibration --models-dir ../shared/models \\
        --recognizer mobilefacenet_peer_128d=yunet_2023mar
    python bench/bench_calibration.py pairs-speed --photos 10000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared")).resolve()
CELEBA = SHARED / "data" / "celeba"
LFW = SHARED / "data" / "lfw"


def _pipeline(models_dir: Path, detector: str, recognizer: str, flip: bool = False):
    from service.config import Settings
    from service.pipeline.pipeline import Pipeline

    settings = Settings(
        models_dir=models_dir,
        detector=detector,
        recognizer=recognizer,
        providers=["CPUExecutionProvider"],
        batching=False,
    )
    return Pipeline.from_settings(settings, flip=flip)


def celeba_chips(pipeline, cache: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """Aligned main-face chips of every CelebA photo with a face: (chips, persons, files)."""
    from service.pipeline.errors import PipelineError
    from service.usecases.calibrate import photo_folder

    contract = json.dumps(
        [
            pipeline.detector_card.id,
            np.asarray(pipeline.template).round(3).tolist(),
            list(pipeline.crop_size),
        ]
    )
    key = hashlib.sha256(contract.encode()).hexdigest()[:12]
    path = cache / f"celeba-{pipeline.detector_card.name}-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["chips"], list(data["persons"]), list(data["files"])
    listed = photo_folder(CELEBA / "images")
    chips, persons, files = [], [], []
    for start in range(0, len(listed), 16):
        batch = listed[start : start + 16]
        found = pipeline.locate_batch([p.read_bytes() for _, p in batch], "largest")
        for (person, photo), faces in zip(batch, found, strict=True):
            if isinstance(faces, PipelineError):
                continue
            chips.append(faces.crops[0])
            persons.append(person)
            files.append(photo.name)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, chips=np.stack(chips), persons=np.array(persons), files=np.array(files))
    return np.stack(chips), persons, files


def _embed(pipeline, chips: np.ndarray, flip: bool) -> tuple[np.ndarray, float, float]:
    """Embeddings, CPU seconds and wall seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    vectors = np.concatenate(
        [pipeline.embedder.embed(chips[i : i + 64], flip=flip) for i in range(0, len(chips), 64)]
    )
    return vectors, time.process_time() - cpu, time.perf_counter() - wall


def rank1(vectors: np.ndarray, persons: list[str]) -> dict:
    enrolled: dict[str, int] = {}
    for row, person in enumerate(persons):
        enrolled.setdefault(person, row)
    gallery_ids = sorted(enrolled)
    gallery = vectors[[enrolled[p] for p in gallery_ids]]
    probes = [row for row, person in enumerate(persons) if enrolled[person] != row]
    best = np.argmax(vectors[probes] @ gallery.T, axis=1)
    correct = int(sum(gallery_ids[best[k]] == persons[row] for k, row in enumerate(probes)))
    return {"rank1": round(correct / len(probes), 6), "correct": correct, "probes": len(probes)}


def tmr_at(vectors: np.ndarray, persons: list[str], fmr: float = 1e-3) -> dict:
    from service.pipeline.calibration import operating_points, tally

    scores = tally(vectors, persons)
    point = operating_points(scores, {"fmr": fmr}, replicates=0).points[0]
    return {
        "tmr": round(1 - point.fnmr, 6),
        "threshold": round(point.threshold, 6),
        "genuine": int(scores.genuine.size),
        "impostors": scores.impostors,
    }


def flip(args) -> dict:
    from service.usecases.eval_pairs import evaluate

    results: dict = {}
    base = _pipeline(args.models_dir, args.detector, args.recognizer)
    chips, persons, _ = celeba_chips(base, args.cache)
    for variant in (False, True):
        vectors, cpu, wall = _embed(base, chips, variant)
        results[f"flip={variant}"] = {
            "celeba": {**rank1(vectors, persons), "tmr_at_fmr_1e-3": tmr_at(vectors, persons)},
            "embed_cpu_ms_per_face": round(cpu / len(chips) * 1000, 3),
            "embed_wall_ms_per_face": round(wall / len(chips) * 1000, 3),
            "faces": len(chips),
        }
    for variant in (False, True):
        pipeline = _pipeline(args.models_dir, args.detector, args.recognizer, flip=variant)
        report = evaluate(pipeline, LFW / "pairs.txt", LFW / "images", chips_dir=args.cache)
        results[f"flip={variant}"]["lfw"] = {
            "accuracy": report["accuracy"],
            "std": report["std"],
            "tmr_at_fmr_1e-3": round(report["thresholds"]["fmr_1e-3"]["tmr"], 6),
            "thresholds": {k: v["threshold"] for k, v in report["thresholds"].items()},
            "no_face": report["no_face"],
            "embed_seconds": report["seconds"],
        }
    return {"flip": results, "detector": args.detector, "recognizer": args.recognizer}


def count_at_least(vectors: np.ndarray, persons: list[str], thresholds: dict) -> dict:
    """Exact count of different-person pairs reaching each threshold (blocks of rows)."""
    codes = np.unique(np.asarray(persons), return_inverse=True)[1].ravel()
    counts = dict.fromkeys(thresholds, 0)
    n = len(vectors)
    step = max(1, (1 << 22) // n)
    for start in range(0, n, step):
        block = vectors[start : start + step] @ vectors[start:].T
        rows = np.arange(start, min(n, start + step))[:, None]
        mask = (np.arange(start, n)[None, :] > rows) & (codes[rows] != codes[None, start:])
        values = block[mask]
        for name, t in thresholds.items():
            counts[name] += int(np.count_nonzero(values >= t))
    return counts


def calibration(args) -> dict:
    from service.pipeline.calibration import impostor_pair_count
    from service.usecases.eval_pairs import pair_file_scores

    results = {}
    for spec in args.recognizer:
        name, _, detector = spec.partition("=")
        detector = detector or args.detector
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "models",
            "calibrate",
            name,
            "--photos",
            str(CELEBA / "images"),
            "--models-dir",
            str(args.models_dir),
            "--detector",
            detector,
            "--no-write",
        ]
        env = {**os.environ, "FACEGATE_PROVIDERS": "CPUExecutionProvider"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        report = json.loads(out.stdout.strip().splitlines()[-1])
        thresholds = {k: v["threshold"] for k, v in report["operating_points"].items()}
        pipeline = _pipeline(args.models_dir, detector, name)
        lfw = pair_file_scores(pipeline, LFW / "pairs.txt", LFW / "images", chips_dir=args.cache)
        identities = [k.split("/")[0] for k in lfw.keys]
        total = impostor_pair_count(np.unique(identities, return_counts=True)[1])
        reached = count_at_least(lfw.embeddings, identities, thresholds)
        from service.pipeline.calibration import CALIBRATION_POINTS, operating_points

        own = operating_points(lfw.scores, CALIBRATION_POINTS, replicates=0)
        results[name] = {
            "detector": detector,
            "celeba": {
                k: report[k]
                for k in ("persons", "photos", "genuine_pairs", "impostor_pairs", "seconds")
            },
            "celeba_points": report["operating_points"],
            "unsupported": list(report["unsupported"]),
            "refused": report["refused"],
            "wall_seconds": round(wall, 1),
            "cpu_seconds": round(
                after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1
            ),
            # ru_maxrss of the children: the largest child so far (KiB on Linux)
            "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
            "lfw_impostors": total,
            "lfw_fmr_at_celeba_thresholds": {
                k: {
                    "false_matches": c,
                    "fmr": c / total,
                    "target": report["operating_points"][k]["target"],
                }
                for k, c in reached.items()
            },
            "lfw_own_thresholds": own.thresholds(),
            "command": " ".join(["facegate", *cmd[3:]]).replace(str(SHARED), "../shared"),
        }
    return {"calibration": results}


def pairs_speed(args) -> dict:
    import tracemalloc

    from service.pipeline.calibration import operating_points, tally

    rng = np.random.default_rng(0)
    n = args.photos
    # clustered like faces: a person's photos around a person's direction
    centres = rng.normal(size=(n // 10 + 1, args.dim)).astype(np.float32)
    persons = np.repeat(np.arange(n // 10 + 1), 10)[:n]
    vectors = centres[persons] + 0.8 * rng.normal(size=(n, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    tracemalloc.start()
    start = time.perf_counter()
    scores = tally(vectors, persons.astype(str))
    tallied = time.perf_counter()
    points = operating_points(scores, replicates=args.replicates)
    done = time.perf_counter()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "photos": n,
        "dim": args.dim,
        "impostor_pairs": scores.impostors,
        "genuine_pairs": int(scores.genuine.size),
        "tail_kept": int(scores.tail.size),
        "tally_seconds": round(tallied - start, 2),
        "bootstrap_seconds": round(done - tallied, 2),
        "replicates": args.replicates,
        "peak_traced_mib": round(peak / 2**20, 1),
        "points": list(points.thresholds()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["flip", "calibration", "pairs-speed"])
    parser.add_argument("--models-dir", type=Path, default=Path("var/models"))
    parser.add_argument("--detector", default="mtcnn")
    parser.add_argument("--recognizer", action="append", default=None)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/facegate-bench-chips"))
    parser.add_argument("--photos", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--replicates", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.command == "flip":
        args.recognizer = (args.recognizer or ["dlib_resnet_v1"])[0]
        report = flip(args)
    elif args.command == "calibration":
        args.recognizer = args.recognizer or ["dlib_resnet_v1"]
        report = calibration(args)
    else:
        report = pairs_speed(args)
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
