"""The one place that turns a cosine similarity into a match decision.

The threshold comes from the recognizer card's ``thresholds[operating_point]``
(calibrated at a false-match rate on labelled pairs). A card without a threshold
for the point falls back to ``FALLBACK_THRESHOLD`` and the decision says so
(``calibrated: false``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: Cosine used when a card has no calibrated threshold for the operating point: a
#: conservative value for L2-normalised ArcFace-style embeddings.
FALLBACK_THRESHOLD = 0.5


@dataclass(frozen=True)
class Decision:
    similarity: float
    threshold: float
    operating_point: str
    match: bool
    calibrated: bool

    def to_dict(self) -> dict:
        return asdict(self)


def threshold_for(card, operating_point: str | None = None) -> tuple[str, float, bool]:
    """(operating point, threshold, calibrated?) for a recognizer card."""
    point = operating_point or card.default_operating_point or "fmr_1e-3"
    thresholds = card.thresholds or {}
    if point in thresholds:
        return point, float(thresholds[point]), True
    return point, FALLBACK_THRESHOLD, False


def decide(similarity: float, card, operating_point: str | None = None) -> Decision:
    """Match when the cosine reaches the card's threshold at the operating point."""
    point, threshold, calibrated = threshold_for(card, operating_point)
    similarity = float(similarity)
    return Decision(similarity=similarity, threshold=threshold, operating_point=point,
                    match=similarity >= threshold, calibrated=calibrated)
