"""``facegate models add`` on every file of ``../shared/models`` with the catalogue hidden.

Each file is copied to a temporary folder under an uninformative name (``unknown_N.onnx``)
and added with ``catalogue=False`` into a fresh models directory, so nothing but its graph
and the labelled sample can tell what it is. For each file the script prints what the add
found (kind, family, input, embedding size, preprocessing, template) against what the
repository's manifest records for that sha256 (``models/manifest.json``, the card of the
reference file ``../shared/models/MANIFEST.md`` describes), every preprocessing candidate's
figure for a recognizer (ROC AUC over every same-person / different-person pair of the
sample, and TMR at FMR 1e-2), the detector check for a detector (photos of the sample with a
face, mean top score) under the family convention the add writes and, for comparison, under
each other colour/normalisation candidate, and the time of each add.

    python bench/bench_models_add.py                          # CelebA sample, 200 photos
    python bench/bench_models_add.py --sample lfw --images 300  # grayscale LFW pairs

The recognizer's search runs through ``--detector`` (default ``yunet_2023mar`` of
``../shared/models``, the detector the manifest's LFW figure for the peer was measured with).
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.config import MANIFEST_PATH, Settings
from service.pipeline.detectors import build_detector
from service.registry import Preprocessing, Registry, sha256_file
from service.usecases.models_add import add_models
from service.usecases.preprocessing_search import (
    NORMALISATIONS,
    check_detector,
    sample_from_dir,
    sample_from_pairs,
)

SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared")).resolve()


def found_vs_recorded(added, recorded) -> dict:
    card = added.card
    pre, ref = card.preprocessing, recorded.preprocessing
    row = {
        "kind": [card.task, recorded.task],
        "family": [card.family, recorded.family],
        "input_size": [pre.input_size, ref.input_size],
        "color": [pre.color, ref.color],
        "mean": [list(pre.mean), list(ref.mean)],
        "std": [list(pre.std), list(ref.std)],
    }
    if card.task == "recognition":
        template = np.asarray(card.alignment.template) if card.alignment else None
        ref_template = np.asarray(
            recorded.alignment.template if recorded.alignment else card.alignment.template
        )
        row["template_max_diff_px"] = float(np.abs(template - ref_template).max())
        row["embedding_dim"] = [card.embedding_dim, recorded.embedding_dim]
        row["thresholds"] = [card.thresholds, recorded.thresholds]
    # a recognizer's family is a label ("onnx": a generic recognizer; the manifest's peer
    # says "arcface"): it changes nothing in how the card is served, so it is not compared
    skip = {"thresholds", "embedding_dim"} | ({"family"} if card.task == "recognition" else set())
    row["agrees"] = (
        all(v[0] == v[1] for k, v in row.items() if isinstance(v, list) and k not in skip)
        and row.get("template_max_diff_px", 0.0) < 1e-3
    )
    return row


def detector_alternatives(added, settings, sample) -> list[list]:
    """The detector check under every colour/normalisation candidate (the add itself takes
    the family's published convention): [label, photos with a face, mean top score]."""
    rows = []
    for color in ("RGB", "BGR"):
        for label, mean, std in NORMALISATIONS:
            if color == "RGB" and label == "Caffe means":
                mean = (mean[2], mean[1], mean[0])
            pre = added.card.preprocessing.model_copy(
                update={"color": color, "mean": mean, "std": std}
            )
            card = added.card.model_copy(
                update={"preprocessing": Preprocessing(**pre.model_dump())}
            )
            check = check_detector(
                build_detector(card, added.model_path, settings), settings, sample
            )
            rows.append([f"{color} {label}", check.with_face, check.images, check.mean_score])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", choices=["celeba", "lfw"], default="celeba")
    parser.add_argument("--images", type=int, default=200, help="photos of the sample")
    parser.add_argument("--detector", default="yunet_2023mar")
    args = parser.parse_args()

    manifest = Registry(MANIFEST_PATH, [])
    by_sha = {c.sha256: c for c in manifest.cards.values()}
    if args.sample == "celeba":
        sample = sample_from_dir(SHARED / "data" / "celeba" / "images", args.images)
    else:
        lfw = SHARED / "data" / "lfw"
        sample = sample_from_pairs(lfw / "pairs.txt", lfw / "images", args.images)
    report = {"sample": sample.description, "detector": args.detector, "files": []}
    with tempfile.TemporaryDirectory() as tmp:
        sources, models_dir = Path(tmp) / "sources", Path(tmp) / "models"
        sources.mkdir()
        settings = Settings(
            models_dir=models_dir,
            detector=str(SHARED / "models" / f"{args.detector}.onnx"),
            providers=["CPUExecutionProvider"],
        )
        for i, path in enumerate(sorted((SHARED / "models").glob("*.onnx"))):
            copy = sources / f"unknown_{i}.onnx"
            shutil.copyfile(path, copy)
            recorded = by_sha[sha256_file(path)]
            start = time.perf_counter()
            result = add_models(
                copy,
                settings,
                Registry(MANIFEST_PATH, [models_dir]),
                name=f"unknown_{i}",
                sample=sample,
                catalogue=False,
            )
            seconds = round(time.perf_counter() - start, 2)
            [added] = result.added
            row = {"file": path.name, "seconds": seconds, **found_vs_recorded(added, recorded)}
            if added.search is not None:
                s = added.search
                row["search"] = {
                    "chosen": s.best.label,
                    "images": s.images,
                    "persons": s.persons,
                    "no_face": s.no_face,
                    "genuine_pairs": s.genuine_pairs,
                    "impostor_pairs": s.impostor_pairs,
                    "candidates": [
                        [f.label, round(f.auc, 4), f.tmr_at_fmr_1e_2] for f in s.candidates
                    ],
                    "warnings": list(s.warnings),
                }
            if added.detector_check is not None:
                c = added.detector_check
                row["detector_check"] = [c.with_face, c.images, c.mean_score]
                row["detector_alternatives"] = detector_alternatives(added, settings, sample)
            report["files"].append(row)
            print(
                f"{path.name}: {row['kind'][0]} {row['family'][0]} in {seconds} s; "
                f"agrees with the manifest: {row['agrees']}",
                file=sys.stderr,
                flush=True,
            )
            for label, with_face, images, score in row.get("detector_alternatives", []):
                print(f"    {label:<30} {with_face}/{images} mean score {score}", file=sys.stderr)
            if "search" in row:
                for label, auc, tmr in row["search"]["candidates"]:
                    print(f"    {label:<50} AUC {auc:.4f}  TMR@1e-2 {tmr}", file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
