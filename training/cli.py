"""``facegate-train``: prepare → train → evaluate → export.

facegate-train prepare SRC DST [--detector yunet_2023mar] [--models-dir DIR]
facegate-train train --config cfg.yaml [key=value ...]      (also under torchrun)
facegate-train evaluate CHECKPOINT_OR_ONNX --pairs pairs.txt --aligned DIR [--raw DIR] --out DIR
facegate-train export CHECKPOINT models/NAME.onnx --pairs ... --aligned ... [--raw ...]
facegate-train export CHECKPOINT models/NAME.onnx --parity-dir ALIGNED   (uncalibrated card)
facegate-train losses                                        (the loss catalogue)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from service.helptext import summary


def _shared_models() -> list[Path]:
    shared = os.environ.get("FACEGATE_SHARED")
    candidates = [Path(shared)] if shared else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared")
    return [c / "models" for c in candidates if (c / "models").is_dir()][:1]


def _cmd_prepare(args) -> int:
    from training.prepare import prepare

    dirs = [Path(d) for d in args.models_dir] or _shared_models()
    report = prepare(
        args.src,
        args.dst,
        detector=args.detector,
        model_dirs=dirs,
        size=args.size,
        workers=args.workers,
        limit_per_identity=args.limit_per_identity,
        progress=not args.quiet,
        recognizer=args.recognizer,
    )
    summary = {k: (len(v) if isinstance(v, list) else v) for k, v in report.as_dict().items()}
    print(json.dumps(summary))
    return 0 if report.aligned else 1


def _cmd_train(args) -> int:
    from training.config import load_config
    from training.train import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0


def _pair_set(args):
    from training import evaluate as ev

    if args.bin:
        return ev.load_bin(args.bin)
    if not (args.pairs and args.aligned):
        raise SystemExit("give --bin, or --pairs and --aligned")
    return ev.load_pairs(args.pairs, args.aligned, args.raw, args.folds, args.max_pairs_per_fold)


def _embedder(model_path: str):
    from training import evaluate as ev

    if model_path.endswith(".onnx"):
        from service.config import MANIFEST_PATH
        from service.registry import Registry

        card, path = Registry(MANIFEST_PATH, _shared_models()).resolve(model_path, "recognition")
        return ev.onnx_embedder(card, path)
    from training.contract import input_contract
    from training.export import input_size_of, load_backbone

    model, state = load_backbone(model_path)
    contract = input_contract(state["config"]["backbone"]["name"])
    return ev.torch_embedder(
        model, input_size=input_size_of(state), mean=contract.mean, std=contract.std
    )


def _cmd_evaluate(args) -> int:
    from training import evaluate as ev

    report = ev.evaluate_model(_embedder(args.model), _pair_set(args))
    paths = ev.save_report(report, args.out, args.stem)
    print(
        json.dumps(
            {
                "accuracy": report["accuracy"],
                "std": report["std"],
                **{k: str(v) for k, v in paths.items()},
            }
        )
    )
    return 0


def _read_bgr(path: Path):
    """A BGR image, or a clear error when the file is not one."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return image


def _cmd_export(args) -> int:
    from training import evaluate as ev
    from training.export import export

    if args.parity_dir and not (args.pairs or args.bin):
        # no evaluation here: the card is calibrated afterwards (e.g. from facegate eval-pairs)
        import numpy as np

        files = sorted(Path(args.parity_dir).glob("*/*.png"))[: args.parity_faces]
        crops = np.empty((0, 0, 0, 3), dtype=np.uint8)  # none: the parity check says so
        if files:
            crops = np.stack([_read_bgr(f) for f in files])
        result = export(
            args.checkpoint,
            args.onnx,
            crops,
            name=args.name,
            description=args.description,
            licence=args.licence,
            training_extra=json.loads(args.training_note or "{}"),
        )
        print(json.dumps(result))
        return 0
    pair_set = _pair_set(args)
    model = _embedder(args.checkpoint)
    report = ev.evaluate_model(model, pair_set)
    if args.reports:
        ev.save_report(report, args.reports, Path(args.onnx).stem)
    evaluation = {"lfw": {k: v for k, v in report.items() if not k.startswith("_")}}
    result = export(
        args.checkpoint,
        args.onnx,
        pair_set.images[: args.parity_faces],
        name=args.name,
        evaluation=evaluation,
        thresholds=ev.card_thresholds(report),
        description=args.description,
        licence=args.licence,
        training_extra=json.loads(args.training_note or "{}"),
    )
    print(json.dumps({**result, "accuracy": report["accuracy"], "std": report["std"]}))
    return 0


def _cmd_losses(args) -> int:
    from training.losses import HEADS, METRIC_LOSSES

    for name, cls in {**HEADS, **METRIC_LOSSES}.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:11s} {doc}")
    return 0


def _add_pairs(parser) -> None:
    parser.add_argument("--pairs", help="pairs.txt (LFW format)")
    parser.add_argument("--aligned", help="aligned crops of the pair images (prepare output)")
    parser.add_argument("--raw", help="raw images, for faces the detector missed")
    parser.add_argument("--bin", help="an InsightFace verification .bin instead of pairs")
    parser.add_argument("--folds", type=int, default=None, help="only the first K folds")
    parser.add_argument("--max-pairs-per-fold", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facegate-train", description=summary(__doc__))
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="PyTorch CPU threads (1 is fastest on a busy shared CPU)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="align raw photos into an ImageFolder of 112x112 crops")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--detector", default="yunet_2023mar", help="manifest name or .onnx path")
    p.add_argument(
        "--models-dir",
        action="append",
        default=[],
        help="where detector files live (default: ../shared/models)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=112,
        help="crop side for the ArcFace template (ignored with --recognizer)",
    )
    p.add_argument(
        "--recognizer",
        default=None,
        help="align with this recognizer card's crop contract (template and size), "
        "e.g. dlib_resnet_v1 for fine-tuning it",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit-per-identity", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train a backbone with a margin loss")
    p.add_argument("--config", type=Path, default=None, help="YAML or JSON config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="pair verification report (JSON + ROC PNG)")
    p.add_argument("model", help="training checkpoint (.pt) or exported .onnx")
    _add_pairs(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--stem", default="verification")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="ONNX + model card, with parity check and calibration")
    p.add_argument("checkpoint")
    p.add_argument("onnx", help="output path, e.g. models/NAME.onnx")
    _add_pairs(p)
    p.add_argument("--name", default=None)
    p.add_argument("--description", default="")
    p.add_argument("--licence", default="")
    p.add_argument("--training-note", default=None, help="JSON merged into the card's training")
    p.add_argument("--parity-faces", type=int, default=32)
    p.add_argument(
        "--parity-dir",
        default=None,
        help="without --pairs/--bin: aligned crops (DIR/<id>/*.png) for the parity "
        "check; the card then has no evaluation or thresholds (calibrate it "
        "afterwards, e.g. bench/finetune_experiment.py calibrate)",
    )
    p.add_argument(
        "--reports",
        type=Path,
        default=None,
        help="also write the evaluation JSON and ROC plot here",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("losses", help="list the available losses")
    p.set_defaults(func=_cmd_losses)
    return parser


def _input_errors() -> tuple[type[Exception], ...]:
    """What a bad argument raises: a missing or unreadable file, a bad value, a model file the
    registry refuses, an export whose parity check fails."""
    from service.registry import ModelError

    errors = [OSError, ValueError, ModelError]
    if "training.export" in sys.modules:
        errors.append(sys.modules["training.export"].ExportError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except _input_errors() as exc:
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
