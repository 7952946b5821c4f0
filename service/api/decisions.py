"""Operating-point selection for requests; the decision rule itself is ``service.pipeline.decision``."""

from __future__ import annotations

from service.pipeline.decision import Decision, decide, threshold_for

from .errors import bad_request

__all__ = ["Decision", "available_points", "check_point", "decide", "threshold_for"]


def available_points(card) -> list[str]:
    """Operating points a request may name: the card's calibrated ones, else its default."""
    points = sorted((card.thresholds or {}).keys())
    if not points:
        points = [card.default_operating_point or "fmr_1e-3"]
    return points


def check_point(card, requested: str | None, settings) -> str:
    """The operating point to use; an unknown one is a 400 listing the available points."""
    points = available_points(card)
    if requested is None:
        for default in (settings.operating_point, card.default_operating_point):
            if default in points:
                return default
        return points[0]
    if requested not in points:
        raise bad_request(
            "unknown_operating_point",
            f"unknown operating point {requested[:32]!r}; available: {', '.join(points)}",
        )
    return requested
