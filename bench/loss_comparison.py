"""Loss comparison after "A Performance Comparison of Loss Functions for Deep Face Recognition".

Trains one (backbone, loss) per run on aligned CelebA crops (``facegate-train
prepare`` output), evaluates each epoch on LFW with the standard 10-fold protocol
(``training.evaluate``: threshold chosen on nine folds, accuracy on the tenth,
mean ± std over the folds), and writes a JSON file plus a Markdown table
(accuracy and epochs to converge).

    python bench/loss_comparison.py --data /tmp/celeba112 --lfw-aligned /tmp/lfw112 \
        --identities 50 --epochs 3 --size 56 --out /tmp/loss_comparison

``--quick`` (for tests) trains every loss on MobileFaceNet for 2 epochs on the first
10 identities and evaluates on 16 pairs of the first fold only (one fold: the threshold
is fitted on the pairs it is scored on); the marginal and triplet runs take P=8
identities per batch, so ``--data`` needs at least 8.  The last line
of output is one JSON object (the runs of this invocation and of earlier ones in ``--out``).

All eight losses on one backbone at the defaults take 8 to 27 minutes on the 2-core
VM (run times in docs/loss-comparison.md), so a backbone's comparison is split into
invocations under 10 minutes each with the same ``--out``, which keeps the runs done
so far and skips them: ``--losses softmax``, ``--losses l2softmax,sphereface``,
``--losses cosface,arcface,center``, ``--losses marginal,triplet``.

"Epochs to converge" is the first epoch whose training loss is within 5% of the
run's final epoch loss (the paper reads it off the loss curve).  Scale is set
by the flags; the defaults fit a 2-core CPU, not the paper's setting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.config import load_config
from training.train import train

SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared")).resolve()
LFW = SHARED / "data" / "lfw"

#: SphereFace's and L-Softmax's λ annealing, faster than the papers' (γ = 0.12) for short runs
FAST_ANNEALING = {"base": 1000, "gamma": 1.0, "power": 1, "lambda_min": 5}

#: (name, loss overrides); parameters as in the papers (scales s = 32 throughout)
LOSSES = [
    ("softmax", {"loss.name": "softmax"}),
    ("l2softmax", {"loss.name": "l2softmax", "loss.params": {"alpha": 16.0}}),
    ("lsoftmax", {"loss.name": "lsoftmax", "loss.params": {"m": 4, "schedule": FAST_ANNEALING}}),
    ("normface", {"loss.name": "normface", "loss.params": {"s": 32.0}}),
    (
        "sphereface",
        {"loss.name": "sphereface", "loss.params": {"m": 4, "schedule": FAST_ANNEALING}},
    ),
    ("cosface", {"loss.name": "cosface", "loss.params": {"s": 32.0, "m": 0.35}}),
    ("arcface", {"loss.name": "arcface", "loss.params": {"s": 32.0, "m": 0.5}}),
    (
        "combined",
        {
            "loss.name": "combined",  # ArcFace paper's CM1 (m1, m2, m3) = (1, 0.3, 0.2)
            "loss.params": {"s": 32.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
        },
    ),
    ("center", {"loss.name": "softmax", "loss.aux": {"name": "center", "weight": 0.01}}),
    (
        "marginal",
        {
            "loss.name": "softmax",
            "loss.aux": {"name": "marginal", "weight": 1.0},
            "loss.pk": [8, 4],
        },
    ),
    (
        "triplet",
        {
            "loss.name": "triplet",
            "loss.params": {"margin": 0.2, "mining": "semi_hard"},
            "loss.pk": [8, 4],
        },
    ),
    (
        "triplet_batch_hard",
        {
            "loss.name": "triplet",
            "loss.params": {"margin": 0.2, "mining": "batch_hard"},
            "loss.pk": [8, 4],
        },
    ),
]

BACKBONES = {
    "mobilefacenet": {"backbone.name": "mobilefacenet", "backbone.params": {"width": 0.25}},
    "mobilenetv1": {"backbone.name": "mobilenetv1", "backbone.params": {"width": 0.25}},
    "resnet50": {"backbone.name": "resnet50", "backbone.params": {"width": 16}},
    "iresnet18": {"backbone.name": "iresnet18", "backbone.params": {"width": 16}},
}


def epochs_to_converge(history: list[dict], tolerance: float = 0.05) -> int:
    final = history[-1]["loss"]
    for entry in history:
        if abs(entry["loss"] - final) <= tolerance * abs(final):
            return entry["epoch"]
    return history[-1]["epoch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--lfw-aligned", required=True)
    ap.add_argument("--identities", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--folds",
        type=int,
        default=10,
        help="LFW folds evaluated (10 = the standard protocol; 1 fits the threshold "
        "on the pairs it scores)",
    )
    ap.add_argument(
        "--pairs-per-fold",
        type=int,
        default=None,
        help="evaluate on the first N pairs of each fold (half same, half different)",
    )
    ap.add_argument("--backbones", default="mobilefacenet")
    ap.add_argument("--losses", default=",".join(name for name, _ in LOSSES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a short run for tests: mobilefacenet, all losses, 10 identities, "
        "2 epochs, batch 16, 16 LFW pairs",
    )
    args = ap.parse_args()
    if args.quick:
        args.identities, args.epochs, args.size, args.batch = 10, 2, 56, 16
        args.folds, args.pairs_per_fold, args.backbones = 1, 16, "mobilefacenet"
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["backbone"], r["loss"]) for r in results}
    wanted = set(args.losses.split(","))
    for backbone in args.backbones.split(","):
        for name, overrides in LOSSES:
            if name not in wanted or (backbone, name) in done:
                continue
            settings = {
                "data.root": args.data,
                "data.max_identities": args.identities,
                "data.size": args.size,
                "data.workers": 0,
                "data.grayscale": 0.2,
                "backbone.embedding_dim": 128,
                **BACKBONES[backbone],
                **overrides,
                "optim.lr": 0.1,
                "optim.warmup_epochs": 0.5,
                "epochs": args.epochs,
                "batch_size": args.batch,
                "threads": args.threads,
                "progress": False,
                "output": str(args.out / f"{backbone}_{name}"),
                "eval.pairs": str(LFW / "pairs.txt"),
                "eval.aligned": args.lfw_aligned,
                "eval.raw": str(LFW / "images"),
                "eval.every": 1,
                "eval.folds": args.folds,
                "eval.max_pairs_per_fold": args.pairs_per_fold,
            }
            cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()])
            start = time.perf_counter()
            summary = train(cfg)
            history = summary["history"]
            best = max(history, key=lambda h: h.get("eval_accuracy", 0.0))
            results.append(
                {
                    "backbone": backbone,
                    "loss": name,
                    "epochs": args.epochs,
                    "identities": summary["identities"],
                    "images": summary["images"],
                    "lfw_folds": args.folds,
                    "lfw_pairs_per_fold": args.pairs_per_fold or 600,
                    "final_accuracy": history[-1].get("eval_accuracy"),
                    "final_std": history[-1].get("eval_std"),
                    "best_accuracy": best.get("eval_accuracy"),
                    "best_epoch": best["epoch"],
                    "epochs_to_converge": epochs_to_converge(history),
                    "loss_first_epoch": history[0]["loss"],
                    "loss_last_epoch": history[-1]["loss"],
                    "seconds": round(time.perf_counter() - start, 1),
                    "samples_per_second": summary["samples_per_second"],
                }
            )
            results_path.write_text(json.dumps(results, indent=2))
            print(json.dumps(results[-1]), flush=True)
    lines = [
        (
            "| backbone | loss | LFW folds | LFW acc. (final) | best (epoch) | "
            "epochs to converge | loss first→last | s |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        folds = r.get("lfw_folds", 1)  # rows of the earlier, one-fold version have no field
        std = f" ± {100 * r['final_std']:.2f}" if folds > 1 and r.get("final_std") else ""
        lines.append(
            f"| {r['backbone']} | {r['loss']} | {folds} | "
            f"{100 * r['final_accuracy']:.2f}%{std} | "
            f"{100 * r['best_accuracy']:.2f}% ({r['best_epoch']}) | "
            f"{r['epochs_to_converge']} | {r['loss_first_epoch']:.3f}→"
            f"{r['loss_last_epoch']:.3f} | {r['seconds']:.0f} |"
        )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
