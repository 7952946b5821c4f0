"""Identify (1:N, open-set): who is each face of an image, among a gallery's subjects?

For every face (largest first), or for one probe embedding: the ``top_k`` most similar
subjects (a subject scores by its best enrolled face: max fusion) and the match, the
best one if it reaches the threshold, else none (the person may not be enrolled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.pipeline.decision import Threshold, decide, operating_point, threshold_for
from service.pipeline.faces import Faces
from service.pipeline.types import Detection, Timings

from .checks import gallery_for_model
from .errors import RequestRefused, ambiguous, missing_field
from .probes import probe_faces
from .work import Worker

if TYPE_CHECKING:
    from service.gallery.audit import AuditEntry
    from service.gallery.service import GalleryService


@dataclass(frozen=True)
class Candidate:
    subject_id: str
    similarity: float  # the subject's best face's cosine (unrounded)
    face_id: int | None


@dataclass(frozen=True)
class IdentifiedFace:
    detection: Detection | None  # None for a probe embedding
    candidates: tuple[Candidate, ...]  # most similar first
    match: str | None  # the best candidate at or above the threshold


@dataclass(frozen=True)
class IdentifyResult:
    gallery: str
    threshold: Threshold
    model: str
    faces: tuple[IdentifiedFace, ...]


async def identify(
    *,
    work: Worker,
    gallery: GalleryService,
    timings: Timings,
    gallery_name: str,
    image: bytes | None = None,
    embedding: object = None,
    model: str | None = None,
    top_k: int = 5,
    top_k_max: int,
    threshold: float | None = None,
    requested_point: str | None = None,
    configured_point: str | None = None,
    audit: AuditEntry | None = None,
) -> IdentifyResult:
    """Search every face of ``image`` (or the probe ``embedding`` of ``model``) in
    ``gallery_name``; the threshold is ``threshold`` if given, else the card's at the
    operating point.  The gallery is checked (exists, this model) before any image work;
    ``audit`` receives the candidates returned."""
    if top_k > top_k_max:
        raise RequestRefused(422, "validation_error", f"top_k: must be between 1 and {top_k_max}")
    if threshold is not None and requested_point is not None:
        raise ambiguous("give threshold or operating_point, not both")
    card = work.pipeline.recognizer_card
    if threshold is not None:
        rule = Threshold.custom(threshold)
    else:
        rule = threshold_for(card, operating_point(card, requested_point, configured_point))
    # Unknown gallery or another model's gallery: refused before any image work.
    await gallery_for_model(work=work, gallery=gallery, name=gallery_name, timings=timings)

    found: Faces
    if embedding is not None:
        if image is not None:
            raise ambiguous("give image or embedding, not both")
        found = probe_faces(pipeline=work.pipeline, text=embedding, model=model)
    elif image is not None:
        found = await work.analyze(image, "all", timings)
    else:
        raise missing_field("missing image field(s): image (or embedding)")
    detections: Sequence[Detection | None] = found.detections or [None] * len(found.embeddings)
    results = await work.call(
        timings, "search", gallery.search, gallery_name, found.embeddings, top_k, work.model_id
    )
    faces = []
    for detection, hits in zip(detections, results, strict=True):
        candidates = tuple(
            Candidate(c["subject_id"], float(c["similarity"]), c.get("face_id")) for c in hits
        )
        best = candidates[0] if candidates else None
        match = None
        if best is not None and decide(best.similarity, rule).match:
            match = best.subject_id
        if audit is not None:
            audit.add([c.subject_id for c in candidates], [c.face_id for c in candidates])
        faces.append(IdentifiedFace(detection, candidates, match))
    return IdentifyResult(gallery_name, rule, work.model_id, tuple(faces))
