"""``facegate eval-pairs``: the LFW pair-verification protocol, end to end.

Every image referenced by the pairs file is decoded, its main face (the largest) detected,
aligned and embedded; pairs are scored by cosine; accuracy is the 10-fold mean
and std (threshold chosen on the other folds). With ``--limit-folds 1`` the
threshold is fitted on the fold itself (reported as ``protocol``). When no face
is found, the image's central square (``NO_FACE_FRACTION`` of the shorter side, see
``service.pipeline.pairs.fallback_landmarks``) is aligned as if it were the face and
the image is counted in ``no_face``.
Thresholds at FMR 1e-2/1e-3/1e-4 come from the scores of every pair of evaluated
images with different identities.

With ``--chips DIR`` the aligned chips are kept in ``DIR`` (one ``.npz`` per detector,
detector input, alignment template and crop size, and image list) and reused: models
that share a crop contract (e.g. ``dlib_resnet_v1`` and models fine-tuned from it) are
compared on the very same chips, and only the embedding is run again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from service.helptext import summary

from ._options import add_model_options, load_pipeline, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval-pairs", help="LFW-style pair verification accuracy", description=summary(__doc__)
    )
    parser.add_argument("--pairs", type=Path, required=True, help="pairs.txt")
    parser.add_argument(
        "--images", type=Path, required=True, help="directory holding <Name>/<Name>_<nnnn>.jpg"
    )
    add_model_options(parser)
    parser.add_argument(
        "--flip",
        action="store_true",
        help="flip-augmented embeddings (default: FACEGATE_FLIP_AUGMENT, else as the card's "
        "thresholds were calibrated)",
    )
    parser.add_argument("--limit-folds", type=int, default=None, help="only the first K folds")
    parser.add_argument("--workers", type=int, default=1, help="images processed in parallel")
    parser.add_argument(
        "--letterbox",
        type=int,
        default=None,
        metavar="N",
        help="run a dynamic-input detector on an NxN letterbox for every image "
        "(as InsightFace's FaceAnalysis does with 640) instead of the "
        "image's own size",
    )
    parser.add_argument(
        "--chips",
        type=Path,
        default=None,
        metavar="DIR",
        help="cache the aligned chips in DIR and reuse them for every model with "
        "the same detector and crop contract",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON report")
    parser.set_defaults(func=run)


def run(args) -> int:

    settings = settings_from_args(args, **({"flip_augment": True} if args.flip else {}))
    pipeline = load_pipeline(settings)
    if pipeline is None:
        return 2
    if args.letterbox:
        pipeline.detector.use_fixed_input((args.letterbox, args.letterbox))
    from service.usecases.eval_pairs import evaluate

    report = evaluate(
        pipeline,
        args.pairs,
        args.images,
        limit_folds=args.limit_folds,
        workers=max(1, args.workers),
        chips_dir=args.chips,
    )
    if not args.json:
        print(
            f"{report['detector']} + {report['recognizer']}: accuracy "
            f"{report['accuracy'] * 100:.2f}% ± {report['std'] * 100:.2f} over "
            f"{report['pairs']} pairs, no_face {report['no_face']}, "
            f"{report['images_per_second']:.1f} images/s",
            file=sys.stderr,
        )
    print(json.dumps(report))
    return 0
