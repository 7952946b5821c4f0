"""``facegate detect IMAGE``: print the faces found in an image as JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from service.helptext import summary

from ._options import add_model_options, read_images, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("detect", help="detect faces in an image (JSON)",
                                   description=summary(__doc__))
    parser.add_argument("image", type=Path)
    add_model_options(parser, recognizer=False)
    parser.set_defaults(func=run)


def run(args) -> int:
    from service.pipeline.decode import decode_image
    from service.pipeline.detectors import build_detector
    from service.pipeline.errors import PipelineError
    from service.registry import ModelError, default_registry

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
    try:
        image = decode_image(data, settings.max_image_bytes, settings.max_image_pixels)
        start = time.perf_counter()
        faces = detector.detect(image)
        elapsed = time.perf_counter() - start
    except PipelineError as exc:
        print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
        return 3
    print(json.dumps({
        "image": str(args.image),
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "detector": card.name,
        "detect_ms": round(elapsed * 1000, 2),
        "faces": [face.to_dict() for face in faces],
    }))
    return 0
