"""Thresholds and the match decision: the one place that turns a cosine into a decision.

A threshold is a :class:`Threshold` value: either the recognizer card's
``thresholds[operating_point]`` (calibrated at a false-match rate on labelled pairs) or a
custom value a request gives.  :func:`operating_point` validates a requested point
against the card (REST and CLI alike refuse an unknown one with
:class:`UnknownOperatingPoint`); a card without any calibrated threshold offers its
default point at ``FALLBACK_THRESHOLD`` and the decision says so (``calibrated: false``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import PipelineError

if TYPE_CHECKING:
    from service.registry import ModelCard

#: Cosine used when a card has no calibrated threshold for the operating point: a
#: conservative value for L2-normalised ArcFace-style embeddings.
FALLBACK_THRESHOLD = 0.5
#: The point a card without a default names.
DEFAULT_POINT = "fmr_1e-3"


class UnknownOperatingPoint(PipelineError):
    """The requested operating point is not one the recognizer's card offers."""

    code, status = "unknown_operating_point", 400


@dataclass(frozen=True)
class Threshold:
    """A decision threshold: a card's at ``operating_point``, or a custom value (point None)."""

    value: float
    operating_point: str | None
    calibrated: bool

    @classmethod
    def custom(cls, value: float) -> Threshold:
        return cls(float(value), None, True)


@dataclass(frozen=True)
class Decision:
    similarity: float
    threshold: float
    operating_point: str | None
    match: bool
    calibrated: bool

    def to_dict(self) -> dict:
        return asdict(self)


def available_points(card: ModelCard) -> list[str]:
    """Operating points a caller may name: the card's calibrated ones, else its default."""
    points = sorted((card.thresholds or {}).keys())
    return points or [card.default_operating_point or DEFAULT_POINT]


def operating_point(card: ModelCard, requested: str | None, configured: str | None = None) -> str:
    """The point to use: ``requested`` (refused if the card does not offer it), else the
    ``configured`` one (``FACEGATE_OPERATING_POINT``) if offered, else the card's default."""
    points = available_points(card)
    if requested is not None:
        if requested not in points:
            raise UnknownOperatingPoint(
                f"unknown operating point {requested[:32]!r}; available: {', '.join(points)}"
            )
        return requested
    for default in (configured, card.default_operating_point):
        if default in points:
            return default
    return points[0]


def threshold_for(card: ModelCard, point: str) -> Threshold:
    """The card's threshold at ``point`` (``FALLBACK_THRESHOLD``, uncalibrated, if none)."""
    thresholds = card.thresholds or {}
    if point in thresholds:
        return Threshold(float(thresholds[point]), point, True)
    return Threshold(FALLBACK_THRESHOLD, point, False)


def decide(similarity: float, threshold: Threshold) -> Decision:
    """Match when the cosine reaches the threshold."""
    similarity = float(similarity)
    return Decision(
        similarity=similarity,
        threshold=threshold.value,
        operating_point=threshold.operating_point,
        match=similarity >= threshold.value,
        calibrated=threshold.calibrated,
    )
