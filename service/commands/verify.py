"""``facegate verify A B``: are the main faces of two images the same person? (JSON)

The main face of each image is the largest, most central one. The decision uses
the recognizer card's threshold at the operating point (``decision.decide``).
Exit status 0 with a JSON decision; 3 with a JSON error when an image is refused
or has no face; 2 when the models cannot be loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.helptext import summary

from ._options import add_model_options, load_pipeline, read_images, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("verify", help="compare the faces in two images (JSON)",
                                   description=summary(__doc__))
    parser.add_argument("image_a", type=Path)
    parser.add_argument("image_b", type=Path)
    add_model_options(parser)
    parser.add_argument("--operating-point", default=None,
                        help="threshold to use, e.g. fmr_1e-3 (default: FACEGATE_OPERATING_POINT)")
    parser.add_argument("--flip", action="store_true", help="flip-augmented embeddings")
    parser.set_defaults(func=run)


def main_face_embedding(pipeline, data: bytes):
    """(embedding, number of faces) of an image's main face; raises ``NoFace``."""
    from service.pipeline.errors import NoFace
    from service.pipeline.pipeline import primary_face

    image = pipeline.decode(data)
    faces = pipeline.detect(image)
    index = primary_face(faces, image.shape)
    if index is None:
        raise NoFace("no face was found in the image")
    return pipeline.embed(pipeline.align(image, [faces[index]]))[0], len(faces)


def run(args) -> int:
    from service.pipeline.decision import decide
    from service.pipeline.errors import PipelineError

    images = read_images([args.image_a, args.image_b])  # before the models load
    if images is None:
        return 2
    extra = {"flip_augment": True} if args.flip else {}
    settings = settings_from_args(args, **extra)
    pipeline = load_pipeline(settings)
    if pipeline is None:
        return 2
    embeddings, counts = [], []
    for path, data in images:
        try:
            embedding, count = main_face_embedding(pipeline, data)
        except PipelineError as exc:
            print(json.dumps({"error": {"code": exc.code, "message": f"{path}: {exc.message}"}}))
            return 3
        embeddings.append(embedding)
        counts.append(count)
    similarity = float(embeddings[0] @ embeddings[1])
    decision = decide(similarity, pipeline.recognizer_card,
                      args.operating_point or settings.operating_point)
    print(json.dumps({
        **decision.to_dict(),
        "similarity": round(similarity, 6),
        "faces": {"a": counts[0], "b": counts[1]},
        "detector": pipeline.detector_card.name,
        "recognizer": pipeline.recognizer_card.name,
        "model_id": pipeline.embedder.model_id,
    }))
    return 0
