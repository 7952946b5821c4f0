"""Fine-tuning experiment: the default recognizer against models fine-tuned from it.

Three sub-commands:

``split``
    Split ``../shared/data/celeba`` by identity (``--train 150 --test 50``, ``--seed``) and
    write the identity lists (ids only) as JSON, e.g. ``training/splits/celeba_150_50.json``.
``rank1``
    Rank-1 identification on the split's held-out identities through the service pipeline
    (decode, detect, align with each model's card, embed): for each identity the first photo
    (sorted by file name) in which the detector finds a face is enrolled, every other photo of
    it is a probe, searched against all enrolled identities (cosine, FAISS flat inner
    product as the gallery does). Photos are decoded, detected and aligned once per crop
    contract and embedded by every model.
``lfw``
    ``facegate eval-pairs`` on the full shared LFW for each model, chips cached across models
    with the same crop contract (``--chips``); prints accuracy, TAR at FAR 1e-3 and 1e-2.

``calibrate``
    ``lfw`` for fine-tuned ``.onnx`` files, then their cards get the LFW figures and the
    thresholds at FMR 1e-2/1e-3/1e-4 (as ``dlib_resnet_v1``'s card was calibrated).

Each prints one JSON line; ``all`` runs ``rank1`` and ``lfw`` and prints a Markdown table.

    python bench/finetune_experiment.py split --out training/splits/celeba_150_50.json
    python bench/finetune_experiment.py all --split training/splits/celeba_150_50.json \\
        --models-dir ~/.cache/facegate/test-models --detector mtcnn \\
        --recognizer dlib_resnet_v1 --recognizer models/facegate_dlib_cosface.onnx ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared")).resolve()
CELEBA = SHARED / "data" / "celeba"
LFW = SHARED / "data" / "lfw"


def make_split(images: Path, train: int, test: int, seed: int) -> dict:
    """Identities of ``images`` shuffled with ``random.Random(seed)``: first ``train`` for
    training, next ``test`` held out."""
    names = sorted(p.name for p in images.iterdir() if p.is_dir())
    if train + test > len(names):
        raise SystemExit(f"{len(names)} identities, cannot split {train} + {test}")
    random.Random(seed).shuffle(names)
    return {
        "dataset": "../shared/data/celeba",
        "seed": seed,
        "rule": "sorted identity ids shuffled with random.Random(seed); first N train",
        "train": sorted(names[:train]),
        "test": sorted(names[train : train + test]),
    }


def _settings(args, recognizer: str):
    from service.config import Settings

    overrides = {
        "detector": args.detector,
        "recognizer": recognizer,
        "providers": ["CPUExecutionProvider"],
        "batching": False,
    }
    if args.models_dir:
        overrides["models_dir"] = Path(args.models_dir)
    return Settings(**overrides)


def rank1(args) -> dict:
    """Rank-1 identification of the held-out identities for every ``--recognizer``."""
    from service.pipeline.pipeline import Pipeline

    split = json.loads(Path(args.split).read_text())
    photos = [
        (identity, path)
        for identity in split["test"]
        for path in sorted((CELEBA / "images" / identity).iterdir())
    ]
    chips_by_contract: dict[str, tuple[np.ndarray, list[str], list[str]]] = {}
    results = {}
    for recognizer in args.recognizer:
        pipeline = Pipeline.from_settings(_settings(args, recognizer), flip=False)
        contract = json.dumps(
            [np.asarray(pipeline.template).round(3).tolist(), list(pipeline.crop_size)]
        )
        if contract not in chips_by_contract:
            chips, ids, files = [], [], []
            for identity, path in photos:
                found = pipeline.locate(path.read_bytes(), "largest", allow_none=True)
                if not found.detections:
                    continue
                chips.append(found.crops[0])
                ids.append(identity)
                files.append(path.name)
            chips_by_contract[contract] = (np.stack(chips), ids, files)
        chips, ids, files = chips_by_contract[contract]
        start = time.perf_counter()
        vectors = np.concatenate(
            [pipeline.embed(chips[i : i + 64]) for i in range(0, len(chips), 64)]
        )
        seconds = time.perf_counter() - start
        enrolled: dict[str, int] = {}
        for row, identity in enumerate(ids):
            enrolled.setdefault(identity, row)
        gallery_ids = sorted(enrolled)
        gallery = vectors[[enrolled[i] for i in gallery_ids]]
        probes = [row for row, identity in enumerate(ids) if enrolled[identity] != row]
        import faiss

        index = faiss.IndexFlatIP(gallery.shape[1])
        index.add(np.ascontiguousarray(gallery, dtype=np.float32))
        _, top = index.search(np.ascontiguousarray(vectors[probes], dtype=np.float32), 1)
        correct = sum(gallery_ids[top[k, 0]] == ids[row] for k, row in enumerate(probes))
        results[pipeline.recognizer_card.name] = {
            "model_id": pipeline.embedder.model_id,
            "rank1": round(correct / len(probes), 6),
            "correct": int(correct),
            "probes": len(probes),
            "enrolled": len(gallery_ids),
            "photos": len(photos),
            "no_face": len(photos) - len(ids),
            "embed_seconds": round(seconds, 2),
        }
    return {"rank1": results, "detector": args.detector, "split": str(args.split)}


def lfw(args) -> dict:
    """``facegate eval-pairs`` on the full shared LFW for every ``--recognizer``."""
    results = {}
    for recognizer in args.recognizer:
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "eval-pairs",
            "--pairs",
            str(LFW / "pairs.txt"),
            "--images",
            str(LFW / "images"),
            "--detector",
            args.detector,
            "--recognizer",
            recognizer,
            "--json",
        ]
        if args.models_dir:
            cmd += ["--models-dir", str(args.models_dir)]
        if args.chips:
            cmd += ["--chips", str(args.chips)]
        env = {**os.environ, "FACEGATE_PROVIDERS": "CPUExecutionProvider"}
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        report = json.loads(out.stdout.strip().splitlines()[-1])
        results[report["recognizer"]] = {
            "model_id": report["model_id"],
            "accuracy": report["accuracy"],
            "std": report["std"],
            "tar_at_far_1e-3": round(report["thresholds"]["fmr_1e-3"]["tmr"], 6),
            "tar_at_far_1e-3_pairs": round(report["tmr_at_fmr_0.001"], 6),
            "tar_at_far_1e-2": round(report["thresholds"]["fmr_1e-2"]["tmr"], 6),
            "no_face": report["no_face"],
            "thresholds": report["thresholds"],
            "command": " ".join(["facegate", *cmd[3:]]),
            "report": {k: v for k, v in report.items() if k not in ("fold_thresholds",)},
        }
    return {"lfw": results, "detector": args.detector}


def _manifest_card(name: str | None) -> dict:
    manifest = json.loads((REPO / "models" / "manifest.json").read_text())
    return next((m for m in manifest["models"] if m["name"] == name), {})


def calibrate(args) -> dict:
    """Write eval-pairs' LFW figures and FMR thresholds into each ``--recognizer`` card (an
    ``.onnx`` path with its ``.card.json``): calibrated as ``dlib_resnet_v1``'s own card was, on
    the cosines of every different-identity pair of the 7,701 LFW images."""
    from service.registry import ModelCard

    report = lfw(args)
    for recognizer in args.recognizer:
        card_path = Path(recognizer).with_name(Path(recognizer).stem + ".card.json")
        card = json.loads(card_path.read_text())
        row = report["lfw"][card["name"]]
        full = row["report"]
        card["thresholds"] = {k: v["threshold"] for k, v in full["thresholds"].items()}
        # the operating point of the card the model was fine-tuned from (dlib_resnet_v1: fmr_1e-2)
        init = card.get("training", {}).get("init")
        card["default_operating_point"] = _manifest_card(init).get("default_operating_point") or (
            "fmr_1e-3"
        )
        card["evaluation"]["lfw_grayscale"] = {
            "detector": full["detector"],
            "accuracy": full["accuracy"],
            "std": full["std"],
            "no_face": full["no_face"],
            "protocol": "facegate eval-pairs: 10-fold pairs.txt, threshold from the other "
            "folds, no flip",
            "tmr_at_thresholds": {k: round(v["tmr"], 6) for k, v in full["thresholds"].items()},
            "impostors": full["thresholds"]["fmr_1e-3"]["impostors"],
            "tar_at_far_1e-3_pairs": row["tar_at_far_1e-3_pairs"],
            "note": "thresholds read off the cosines of every pair of the 7,701 pairs.txt "
            "images with different identities",
            "command": row["command"]
            .replace(str(SHARED), "../shared")
            .replace(str(Path.home()), "~"),
        }
        ModelCard.model_validate(card)
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    return report


def table(lfw_report: dict, rank1_report: dict) -> str:
    lines = [
        "| model | LFW 10-fold accuracy | TAR @ FAR 1e-3 (pairs) | held-out rank-1 |",
        "|---|---|---|---|",
    ]
    for name, row in lfw_report["lfw"].items():
        r1 = rank1_report["rank1"].get(name, {})
        rank = r1.get("rank1", float("nan")) * 100
        lines.append(
            f"| {name} | {row['accuracy'] * 100:.2f}% ± {row['std'] * 100:.2f} | "
            f"{row['tar_at_far_1e-3'] * 100:.2f}% | {rank:.2f}%"
            f" ({r1.get('correct')}/{r1.get('probes')}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split")
    p.add_argument("--train", type=int, default=150)
    p.add_argument("--test", type=int, default=50)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--out", type=Path, required=True)
    for name in ("rank1", "lfw", "all", "calibrate"):
        p = sub.add_parser(name)
        p.add_argument("--split", type=Path, default=REPO / "training/splits/celeba_150_50.json")
        p.add_argument("--recognizer", action="append", required=True)
        p.add_argument("--detector", default="mtcnn")
        p.add_argument("--models-dir", default=None)
        p.add_argument("--chips", type=Path, default=None, help="eval-pairs chip cache")
    args = parser.parse_args(argv)
    if args.command == "split":
        split = make_split(CELEBA / "images", args.train, args.test, args.seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(split, indent=1) + "\n")
        print(
            json.dumps(
                {"out": str(args.out), "train": len(split["train"]), "test": len(split["test"])}
            )
        )
        return 0
    if args.command == "rank1":
        print(json.dumps(rank1(args)))
        return 0
    if args.command == "lfw":
        print(json.dumps(lfw(args)))
        return 0
    if args.command == "calibrate":
        print(json.dumps(calibrate(args)))
        return 0
    r1, lf = rank1(args), lfw(args)
    print(json.dumps({**r1, **lf}))
    print(table(lf, r1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
