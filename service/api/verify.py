"""``POST /v1/verify``: are two faces the same person (1:1)?"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, Request

from service.gallery.errors import InvalidEmbedding
from service.gallery.store import GalleryFaces
from service.pipeline.decision import decide, operating_point, threshold_for
from service.pipeline.types import Timings

from . import analysis
from .audit import VerifyAudit
from .deps import State, require_api_key
from .errors import ApiError, bad_request
from .images import read_payload
from .openapi import ERROR_RESPONSES, image_body
from .probes import probe_analysis
from .schemas import Face, SubjectRef, VerifyOptions, VerifyResponse
from .scopes import allow_gallery, require_scope

router = APIRouter(prefix="/v1", tags=["verify"], dependencies=[Depends(require_api_key)])


def _best_face(faces: GalleryFaces, embedding: np.ndarray) -> tuple[float, int]:
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


@router.post(
    "/verify",
    response_model=VerifyResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=image_body(("image1", "image2"), VerifyOptions),
    summary="Compare two faces, or a face with an enrolled subject",
    dependencies=[require_scope("verify")],
)
async def verify(request: Request, state: State, entry: VerifyAudit, timings: bool = False) -> dict:
    """Compare the face in ``image1`` with the face in ``image2``, or with the enrolled
    subject ``gallery``/``subject_id``.

    A subject with several enrolled faces is compared by its **best** face (max
    fusion: the highest cosine over the subject's faces).  With several faces in an
    image the largest is used, or the request is refused with ``multiple_faces=refuse``.
    Instead of ``image1``: ``embedding`` (base64 float32) with ``model`` (the served model's
    id); the answer then has no ``face1``.
    The decision uses the recognition model card's threshold at ``operating_point``
    (default: the card's / the service's default); ``match`` is ``similarity >= threshold``.
    """
    settings = state.settings
    clock = Timings()
    payload = await read_payload(
        request, ("image1", "image2"), (), settings.max_image_bytes, timings=clock
    )
    opts = payload.options(VerifyOptions)
    if opts.embedding is not None:
        if "image1" in payload.images:
            raise bad_request("ambiguous_request", "give image1 or embedding, not both")
        probe = probe_analysis(state, opts.embedding, opts.model)
    elif "image1" not in payload.images:
        raise ApiError(422, "missing_field", "missing image field(s): image1 (or embedding)")
    else:
        probe = None

    async def first_face():
        if probe is not None:
            return probe
        [found] = await analysis.analyze_labelled(
            state, {"image1": payload.images["image1"]}, policy, clock
        )
        return found

    if opts.gallery:
        allow_gallery(request, opts.gallery)
        entry.gallery = opts.gallery
        entry.add([opts.subject_id])
    card = state.pipeline.recognizer_card
    point = operating_point(card, opts.operating_point, settings.operating_point)
    model_id = state.model_id
    policy = opts.multiple_faces
    subject = None

    if "image2" in payload.images:
        if opts.gallery or opts.subject_id:
            raise bad_request(
                "ambiguous_request", "send either image2 or gallery + subject_id, not both"
            )
        if probe is not None:
            first = probe
            [second] = await analysis.analyze_labelled(
                state, {"image2": payload.images["image2"]}, policy, clock
            )
        else:
            first, second = await analysis.analyze_labelled(
                state,
                {"image1": payload.images["image1"], "image2": payload.images["image2"]},
                policy,
                clock,
            )
        similarity = float(np.dot(first.embeddings[0], second.embeddings[0]))
        face2 = second.detections[0].to_dict()
    else:
        if not (opts.gallery and opts.subject_id):
            raise ApiError(
                422,
                "missing_field",
                "send image2, or gallery and subject_id to compare with an enrolled subject",
            )
        # Unknown gallery/subject or a gallery of another model: refused before any image work.
        await analysis.gallery_for_model(state, opts.gallery, clock)
        faces = await analysis.call(
            clock, "search", state.gallery.subject_faces, opts.gallery, opts.subject_id, model_id
        )
        if not len(faces.face_ids):
            raise ApiError(
                422,
                "no_enrolled_face",
                f"subject {opts.subject_id!r} has no enrolled face to compare with",
            )
        first = await first_face()
        similarity, face_id = _best_face(faces, first.embeddings[0])
        entry.add(face_ids=[face_id])
        subject = SubjectRef(gallery=opts.gallery, subject_id=opts.subject_id, face_id=face_id)
        face2 = None

    state.metrics.observe_stages(request.scope, clock.stages)
    decision = decide(similarity, threshold_for(card, point))
    return VerifyResponse(
        match=decision.match,
        similarity=round(similarity, 6),
        threshold=decision.threshold,
        calibrated=decision.calibrated,
        operating_point=point,
        model=model_id,
        face1=Face(**first.detections[0].to_dict()) if first.detections else None,
        face2=Face(**face2) if face2 else None,
        subject=subject,
        timings=analysis.timings_ms(clock) if timings else None,
    ).model_dump(exclude_none=True)
