"""``facegate verify A B``: are the main faces of two images the same person? (JSON)

The same use case as ``POST /v1/verify`` (``service.usecases.verify.verify``), run
in-process: the main face of each image is its largest (``service.pipeline.faces.main_face``).
The decision uses the recognizer card's threshold at
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
    import asyncio

    from service.pipeline.errors import PipelineError
    from service.pipeline.types import Timings
    from service.usecases.verify import verify
    from service.usecases.work import Worker

    images = read_images([args.image_a, args.image_b])  # before the models load
    if images is None:
        return 2
    extra = {"flip_augment": True} if args.flip else {}
    settings = settings_from_args(args, **extra)
    pipeline = load_pipeline(settings)
    if pipeline is None:
        return 2
    (path_a, data_a), (path_b, data_b) = images
    try:
        result = asyncio.run(
            verify(
                work=Worker(pipeline, threads=False),
                timings=Timings(),
                image1=data_a,
                image2=data_b,
                requested_point=args.operating_point,
                configured_point=settings.operating_point,
                labels=(str(path_a), str(path_b)),
            )
        )
    except PipelineError as exc:  # an image refused, or an unknown operating point
        print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
        return 3
    assert result.face1 is not None and result.face2 is not None
    print(
        json.dumps(
            {
                **result.decision.to_dict(),
                "similarity": round(result.similarity, 6),
                "faces": {"a": result.detected1, "b": result.detected2},
                "face_a": result.face1.to_dict(),
                "face_b": result.face2.to_dict(),
                "detector": pipeline.detector_card.name,
                "recognizer": pipeline.recognizer_card.name,
                "model_id": pipeline.model_id,
            }
        )
    )
    return 0
