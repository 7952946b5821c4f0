"""Typed gallery errors: each carries a stable ``code`` and the HTTP ``status`` it maps to.

The REST layer turns any :class:`GalleryError` into
``{"error": {"code": ..., "message": ...}}`` with ``status``; nothing here knows HTTP.
"""

from __future__ import annotations


class GalleryError(Exception):
    """Base of every error the gallery raises on purpose."""

    code = "gallery_error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class GalleryNotFound(GalleryError):
    code = "gallery_not_found"
    status = 404


class SubjectNotFound(GalleryError):
    code = "subject_not_found"
    status = 404


class FaceNotFound(GalleryError):
    code = "face_not_found"
    status = 404


class GalleryModelMismatch(GalleryError):
    """Embeddings of another model id are never mixed into a gallery."""

    code = "model_mismatch"
    status = 409

    def __init__(self, gallery: str, gallery_model: str, model_id: str) -> None:
        super().__init__(
            f"gallery {gallery!r} holds embeddings of model {gallery_model!r}, not {model_id!r}; "
            f"embeddings of different models are never mixed. To switch models, re-enrol: create a "
            f"new gallery with model {model_id!r} and add each subject's photos to it again (or "
            f"delete gallery {gallery!r} first and re-enrol under the same name)."
        )
        self.gallery = gallery
        self.gallery_model = gallery_model
        self.model_id = model_id


class Conflict(GalleryError):
    code = "conflict"
    status = 409


class InvalidInput(GalleryError, ValueError):
    """A malformed argument (name, cursor, limit); nothing was changed."""

    code = "invalid_input"
    status = 422


class InvalidEmbedding(InvalidInput):
    """Wrong dimension, wrong dtype/shape, non-finite or not L2-normalised."""

    code = "invalid_embedding"
    status = 422
