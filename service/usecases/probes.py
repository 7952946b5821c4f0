"""Probe embeddings: identify and verify for clients that embed elsewhere.

Instead of an image, a client may send ``embedding`` (base64 of the little-endian float32
vector, as ``/v1/embed`` answers with ``embedding_format=base64``) together with ``model``,
the id of the model that made it (``model`` of ``/v1/embed`` or ``/v1/info``).  It must be
the served model (409 ``model_mismatch``: embeddings of two models cannot be compared) and
the vector must have its dimension, be finite and L2-normalised (422 ``invalid_embedding``).
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING

import numpy as np

from service.gallery.errors import InvalidEmbedding
from service.gallery.service import check_vectors
from service.pipeline.faces import Faces

from .errors import RequestRefused, missing_field

if TYPE_CHECKING:
    from service.pipeline.pipeline import Pipeline


def probe_faces(*, pipeline: Pipeline, text: object, model: str | None) -> Faces:
    """The probe as :class:`Faces` with one embedding and no detected face."""
    if model is None:
        raise missing_field(
            "model: the id of the model that made the embedding is required with embedding"
        )
    if model != pipeline.model_id:
        raise RequestRefused(
            409,
            "model_mismatch",
            f"the embedding was made by model {model!r}, but this service serves "
            f"{pipeline.model_id!r}; embeddings of different models cannot be compared",
        )
    dim = pipeline.dim
    if not isinstance(text, str):
        raise InvalidEmbedding("embedding must be a base64 string")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidEmbedding("embedding is not valid base64") from None
    if len(raw) != 4 * dim:
        raise InvalidEmbedding(
            f"embedding must be {dim} float32 values ({4 * dim} bytes), got {len(raw)} bytes"
        )
    vector = check_vectors(np.frombuffer(raw, dtype="<f4"), dim, batch=False)
    size = pipeline.crop_size
    crops = np.zeros((0, size[1], size[0], 3), np.uint8)
    return Faces([], crops, (0, 0), 0, embeddings=vector[None, :])
