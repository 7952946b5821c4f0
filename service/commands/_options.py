"""Options shared by the pipeline sub-commands (models directory, model choice, settings)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_options(
    parser: argparse.ArgumentParser, detector: bool = True, recognizer: bool = True
) -> None:
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="models directory (default: FACEGATE_MODELS_DIR or var/models)",
    )
    if detector:
        parser.add_argument(
            "--detector",
            default=None,
            help="detector: manifest name or .onnx path (default: FACEGATE_DETECTOR)",
        )
        parser.add_argument(
            "--det-size",
            type=int,
            default=None,
            help="largest detector input side (default: FACEGATE_DET_SIZE)",
        )
    if recognizer:
        parser.add_argument(
            "--recognizer",
            default=None,
            help="recognizer: manifest name or .onnx path (default: FACEGATE_RECOGNIZER)",
        )


def settings_from_args(args: argparse.Namespace, **extra):
    """``Settings`` from the environment, overridden by the options given on the command line."""
    from service.config import Settings

    overrides = dict(extra)
    for field in ("models_dir", "detector", "recognizer", "det_size"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def load_pipeline(settings):
    """The configured pipeline, or None after printing why its models cannot be loaded."""
    import sys

    from service.pipeline.pipeline import Pipeline
    from service.registry import ModelError

    try:
        return Pipeline.from_settings(settings)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def served_recognizer(settings):
    """(card, model id) of the recognizer ``settings`` serve, without loading it: the id its
    galleries hold (``+flip`` when flip-augmented, as ``FACEGATE_FLIP_AUGMENT`` or its card
    says), or None after printing why the card cannot be resolved."""
    import sys

    from service.pipeline.embed import served_model_id
    from service.registry import ModelError, default_registry, select_recognizer

    try:
        registry = default_registry(settings)
        ref, _ = select_recognizer(settings.recognizer, registry)
        card, _ = registry.resolve(ref, task="recognition")
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return card, served_model_id(card, settings)


def read_images(paths: list[Path]) -> list[tuple[Path, bytes]] | None:
    """Each file's bytes, or None after printing why one cannot be read (checked before any
    model is loaded, so a wrong path is reported at once)."""
    import sys

    images = []
    for path in paths:
        try:
            images.append((path, path.read_bytes()))
        except OSError as exc:
            print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr)
            return None
    return images
