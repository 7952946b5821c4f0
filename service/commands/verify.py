"""``facegate verify A B``: are the main faces of two images the same person? (JSON)

The main face of each image is its largest (``service.pipeline.faces.main_face``, the
rule ``POST /v1/verify`` follows). The decision uses the recognizer card's threshold at
the operating point (``decision.decide``); an operating point the card does not offer is
refused, as by the REST API. Exit status 0 with a JSON decision; 3 with a JSON error when
an image is refused or has no face, or the operating point is unknown; 2 when an image
cannot be read or the models cannot be loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.helptext import summary

from ._options import add_model_options, load_pipeline, read_images, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify", help="compare the faces in two images (JSON)", description=summary(__doc__)
    )
    parser.add_argument("image_a", type=Path)
    parser.add_argument("image_b", type=Path)
    add_model_options(parser)
    parser.add_argument(
        "--operating-point",
        default=None,
        help="threshold to use, e.g. fmr_1e-3 (default: FACEGATE_OPERATING_POINT)",
    )
    parser.add_argument("--flip", action="store_true", help="flip-augmented embeddings")
    parser.set_defaults(func=run)


def run(args) -> int:
    from service.pipeline.decision import (
        UnknownOperatingPoint,
        decide,
        operating_point,
        threshold_for,
    )
    from service.pipeline.errors import PipelineError

    images = read_images([args.image_a, args.image_b])  # before the models load
    if images is None:
        return 2
    extra = {"flip_augment": True} if args.flip else {}
    settings = settings_from_args(args, **extra)
    pipeline = load_pipeline(settings)
    if pipeline is None:
        return 2
    try:
        point = operating_point(
            pipeline.recognizer_card, args.operating_point, settings.operating_point
        )
    except UnknownOperatingPoint as exc:
        print(json.dumps({"error": {"code": exc.code, "message": str(exc)}}))
        return 3
    found = []
    for path, data in images:
        try:
            found.append(pipeline.locate(data, "largest"))
        except PipelineError as exc:
            print(json.dumps({"error": {"code": exc.code, "message": f"{path}: {exc.message}"}}))
            return 3
    pipeline.embed_faces(found)
    similarity = float(found[0].embeddings[0] @ found[1].embeddings[0])
    decision = decide(similarity, threshold_for(pipeline.recognizer_card, point))
    print(
        json.dumps(
            {
                **decision.to_dict(),
                "similarity": round(similarity, 6),
                "faces": {"a": found[0].detected, "b": found[1].detected},
                "face_a": found[0].detections[0].to_dict(),
                "face_b": found[1].detections[0].to_dict(),
                "detector": pipeline.detector_card.name,
                "recognizer": pipeline.recognizer_card.name,
                "model_id": pipeline.model_id,
            }
        )
    )
    return 0
