"""Face detectors, built from a model card by ``build_detector``.

Each family maps to a lazy ``"module:Class"`` import string; every class takes
``(card, path, settings)`` and implements ``detect`` / ``detect_batch``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..types import Detector

if TYPE_CHECKING:
    from service.config import Settings
    from service.registry import ModelCard

DETECTOR_FAMILIES: dict[str, str] = {
    "scrfd": "service.pipeline.detectors.scrfd:SCRFDDetector",
    "yunet": "service.pipeline.detectors.yunet:YuNetDetector",
    "retinaface": "service.pipeline.detectors.retinaface:RetinaFaceDetector",
    "mtcnn": "service.pipeline.detectors.mtcnn:MTCNNDetector",
}


def detector_class(family: str) -> type:
    """The detector class for a card family (imported on first use)."""
    try:
        target = DETECTOR_FAMILIES[family]
    except KeyError:
        known = ", ".join(sorted(DETECTOR_FAMILIES))
        raise ValueError(f"unknown detector family {family!r}; known: {known}") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_detector(card: ModelCard, path: Path | str, settings: Settings) -> Detector:
    """A ready (warmed-up) detector for ``card`` whose verified weights are at ``path``."""
    if card.task != "detection":
        raise ValueError(f"model {card.name!r} is a {card.task} model, not a detector")
    detector = detector_class(card.family)(card, path, settings)
    if not isinstance(detector, Detector):
        raise TypeError(f"{type(detector).__name__} does not implement the Detector protocol")
    return detector
