"""Verify (1:1): are two faces the same person, or a face and an enrolled subject?

Four request shapes: the first face from an image or a probe embedding, compared with the
main face of a second image or with an enrolled subject's best face (max fusion).  The
decision is the recognizer card's threshold at the operating point
(:mod:`service.pipeline.decision`).  ``POST /v1/verify`` and ``facegate verify`` both
answer through :func:`verify`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from service.gallery.errors import InvalidEmbedding
from service.pipeline.decision import Decision, decide, operating_point, threshold_for
from service.pipeline.faces import Faces
from service.pipeline.types import Detection, Timings

from .checks import gallery_for_model
from .errors import RequestRefused, ambiguous, missing_field
from .probes import probe_faces
from .work import Worker

if TYPE_CHECKING:
    from service.gallery.audit import AuditEntry
    from service.gallery.service import GalleryService
    from service.gallery.store import GalleryFaces


@dataclass(frozen=True)
class SubjectMatch:
    """The enrolled subject a face was compared with, and its best-matching face."""

    gallery: str
    subject_id: str
    face_id: int


@dataclass(frozen=True)
class VerifyResult:
    decision: Decision  # similarity (unrounded), threshold, operating point, match
    model: str  # the recognizer's model id
    operating_point: str  # the decision's operating point
    face1: Detection | None  # the first image's main face (None for a probe embedding)
    detected1: int  # faces the detector found in the first image (0 for a probe)
    face2: Detection | None = None  # the second image's main face (None: a subject)
    detected2: int = 0
    subject: SubjectMatch | None = None

    @property
    def similarity(self) -> float:
        return self.decision.similarity


def best_face(faces: GalleryFaces, embedding: np.ndarray) -> tuple[float, int]:
    """(similarity, face_id) of the subject's best face for ``embedding`` (max fusion).

    Scored against every enrolled face of the subject, so the answer is exact with
    every index type (an approximate index can miss a subject's faces).
    """
    if faces.embeddings.shape[1] != embedding.shape[0]:
        raise InvalidEmbedding(
            f"gallery {faces.name!r} holds {faces.embeddings.shape[1]}-d "
            f"embeddings, the probe is {embedding.shape[0]}-d"
        )
    scores = faces.embeddings @ embedding
    best = int(np.argmax(scores))
    return float(scores[best]), int(faces.face_ids[best])


async def verify(
    *,
    work: Worker,
    timings: Timings,
    image1: bytes | None = None,
    image2: bytes | None = None,
    embedding: object = None,
    model: str | None = None,
    gallery_name: str | None = None,
    subject_id: str | None = None,
    requested_point: str | None = None,
    configured_point: str | None = None,
    policy: Literal["largest", "refuse"] = "largest",
    labels: tuple[str, str] = ("image1", "image2"),
    gallery: GalleryService | None = None,
    allow_gallery: Callable[[str], None] | None = None,
    audit: AuditEntry | None = None,
) -> VerifyResult:
    """Compare ``image1`` (or the probe ``embedding`` of ``model``) with ``image2`` or with
    the enrolled subject ``gallery_name``/``subject_id``.

    Checked in this order, each before any image work that follows it: image1 xor
    embedding, the probe, the caller's right to the gallery (``allow_gallery``), the
    operating point, image2 xor subject; for a subject: the gallery exists for this model,
    the subject exists and has a face.  ``labels`` name the two images in refusals.
    ``audit`` (the request's audit entry) receives the gallery, subject and face compared.
    """
    probe: Faces | None = None
    if embedding is not None:
        if image1 is not None:
            raise ambiguous("give image1 or embedding, not both")
        probe = probe_faces(pipeline=work.pipeline, text=embedding, model=model)
    elif image1 is None:
        raise missing_field("missing image field(s): image1 (or embedding)")
    if gallery_name:
        if allow_gallery is not None:
            allow_gallery(gallery_name)
        if audit is not None:
            audit.gallery = gallery_name
            audit.add([subject_id])
    card = work.pipeline.recognizer_card
    point = operating_point(card, requested_point, configured_point)
    first_label, second_label = labels

    if image2 is not None:
        if gallery_name or subject_id:
            raise ambiguous("send either image2 or gallery + subject_id, not both")
        if probe is not None:
            first = probe
            [second] = await work.analyze_labelled({second_label: image2}, policy, timings)
        else:
            assert image1 is not None
            first, second = await work.analyze_labelled(
                {first_label: image1, second_label: image2}, policy, timings
            )
        similarity = float(np.dot(first.embeddings[0], second.embeddings[0]))
        return VerifyResult(
            decision=decide(similarity, threshold_for(card, point)),
            model=work.model_id,
            operating_point=point,
            face1=_main(first),
            detected1=first.detected,
            face2=_main(second),
            detected2=second.detected,
        )

    if not (gallery_name and subject_id):
        raise missing_field(
            "send image2, or gallery and subject_id to compare with an enrolled subject"
        )
    if gallery is None:
        raise RuntimeError("verify against a subject needs the gallery")
    # Unknown gallery/subject or a gallery of another model: refused before any image work.
    await gallery_for_model(work=work, gallery=gallery, name=gallery_name, timings=timings)
    faces = await work.call(
        timings, "search", gallery.subject_faces, gallery_name, subject_id, work.model_id
    )
    if not len(faces.face_ids):
        raise RequestRefused(
            422, "no_enrolled_face", f"subject {subject_id!r} has no enrolled face to compare with"
        )
    if probe is None:
        assert image1 is not None
        [probe] = await work.analyze_labelled({first_label: image1}, policy, timings)
    similarity, face_id = best_face(faces, probe.embeddings[0])
    if audit is not None:
        audit.add(face_ids=[face_id])
    return VerifyResult(
        decision=decide(similarity, threshold_for(card, point)),
        model=work.model_id,
        operating_point=point,
        face1=_main(probe),
        detected1=probe.detected,
        subject=SubjectMatch(gallery_name, subject_id, face_id),
    )


def _main(found: Faces) -> Detection | None:
    return found.detections[0] if found.detections else None
