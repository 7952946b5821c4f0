"""``facegate models calibrate NAME``: thresholds calibrated on the operator's own photos.

``--photos DIR`` (one sub-folder of photos per person) or ``--pairs pairs.txt --images DIR``
(LFW format). Every photo goes through the served detector, main-face rule and alignment;
genuine pairs are all same-person pairs, impostor pairs all pairs of two different persons.
Thresholds at FMR 1e-2 ... 1e-6 are reported only where at least 30/FMR impostor pairs
exist (otherwise the photos needed are named), with the FNMR there and 95% intervals from a
bootstrap over persons. The result is written as NAME.calibration.json in the models
directory, bound to the model file's sha256, and the service uses its thresholds from its
next start. ``--report DIR`` writes an HTML page with the DET curve, the score histograms
and the closest impostor and farthest genuine pairs (needs the ``report`` extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from service.helptext import summary

from ._options import add_model_options, settings_from_args


def register(actions) -> None:
    parser = actions.add_parser(
        "calibrate",
        help="calibrate a recognizer's thresholds on your own photos",
        description=summary(__doc__),
    )
    parser.add_argument("name", help="recognizer (card name)")
    add_model_options(parser, recognizer=False)
    parser.add_argument("--photos", type=Path, help="folder with one sub-folder per person")
    parser.add_argument("--pairs", type=Path, help="LFW-format pairs.txt (with --images)")
    parser.add_argument("--images", type=Path, help="folder of the images pairs.txt names")
    parser.add_argument("--report", type=Path, metavar="DIR", help="write an HTML report here")
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--no-write", action="store_true", help="report only; write no calibration file"
    )
    parser.set_defaults(func=run)


def _fail(code: str, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    print(json.dumps({"error": {"code": code, "message": message}}))
    return 3


def run(args) -> int:
    from service.pipeline.pipeline import Pipeline
    from service.registry import ModelError, Registry
    from service.usecases.calibrate import (
        CalibrationError,
        calibrate_pairs,
        calibrate_photos,
        write_calibration,
    )

    if (args.photos is None) == (args.pairs is None) or (args.pairs is None) != (
        args.images is None
    ):
        return _fail("invalid_arguments", "give --photos DIR, or --pairs FILE with --images DIR")
    settings = settings_from_args(args, recognizer=args.name)
    try:
        registry = Registry(settings.manifest, [settings.models_dir], calibrations=False)
        pipeline = Pipeline.from_settings(settings, registry)
    except ModelError as exc:
        return _fail("model_error", str(exc))
    try:
        if args.photos is not None:
            result = calibrate_photos(
                pipeline, args.photos, replicates=args.replicates, seed=args.seed
            )
        else:
            result = calibrate_pairs(
                pipeline, args.pairs, args.images, replicates=args.replicates, seed=args.seed
            )
        for refused in result.refused:
            print(f"refused {refused.path}: {refused.code}: {refused.message}", file=sys.stderr)
        report = result.to_dict()
        if not args.no_write:
            card = pipeline.recognizer_card
            path = write_calibration(result, settings.models_dir, card.default_operating_point)
            report["written"] = str(path)
        if args.report is not None:
            from service.usecases.calibration_report import write_report

            report["report"] = str(write_report(result, pipeline, args.report))
    except CalibrationError as exc:
        return _fail(exc.code, str(exc))
    for name, point in report["operating_points"].items():
        ci = point.get("threshold_ci")
        print(
            f"{name}: threshold {point['threshold']:.4f}"
            + (f" [{ci['low']:.4f}, {ci['high']:.4f}]" if ci else "")
            + f", FNMR {point['fnmr'] * 100:.2f}%",
            file=sys.stderr,
        )
    for name, need in report["unsupported"].items():
        print(
            f"{name}: not supported by {result.source['impostor_pairs']} impostor pairs "
            f"(rule of 30: {need['impostors_needed']} needed, about {need['photos_needed']} "
            f"photos of {need['persons_needed']} persons)",
            file=sys.stderr,
        )
    print(json.dumps(report))
    return 0
