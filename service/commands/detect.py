"""``facegate detect IMAGE``: print the faces found in an image as JSON.

Every face, largest first, as ``POST /v1/detect`` lists them (the pipeline's analysis
path with policy ``all``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from service.helptext import summary

from ._options import add_model_options, read_images, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "detect", help="detect faces in an image (JSON)", description=summary(__doc__)
    )
    parser.add_argument("image", type=Path)
    add_model_options(parser, recognizer=False)
    parser.set_defaults(func=run)


def run(args) -> int:
    import asyncio

    from service.pipeline.detectors import build_detector
    from service.pipeline.errors import PipelineError
    from service.pipeline.pipeline import Pipeline
    from service.pipeline.types import Timings
    from service.registry import ModelError, default_registry
    from service.usecases.extract import extract_faces
    from service.usecases.work import Worker

    images = read_images([args.image])  # before the model loads
    if images is None:
        return 2
    [(_, data)] = images
    settings = settings_from_args(args)
    try:
        card, path = default_registry(settings).resolve(settings.detector, task="detection")
        detector = build_detector(card, path, settings)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    timings = Timings()
    work = Worker(Pipeline(detector, None, settings), threads=False)
    try:
        found = asyncio.run(extract_faces(work=work, image=data, timings=timings, policy="all"))
    except PipelineError as exc:
        print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
        return 3
    print(
        json.dumps(
            {
                "image": str(args.image),
                "width": found.width,
                "height": found.height,
                "detector": card.name,
                "detect_ms": round(timings.stages["detect"] * 1000, 2),
                "faces": [face.detection.to_dict() for face in found.faces],
            }
        )
    )
    return 0
