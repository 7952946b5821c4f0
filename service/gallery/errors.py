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
            f"embeddings of different models are never mixed. To switch models, re-enrol it: "
            f'POST /v1/galleries/NEW/reenrol with {{"source": "{gallery}"}} (or `facegate '
            f"gallery reenrol --source {gallery} --target NEW`) creates gallery NEW for model "
            f"{model_id!r} and re-enrols every subject from the photos stored with "
            f"FACEGATE_STORE_IMAGES=true; without stored photos, add each subject's photos to a "
            f"new gallery again."
        )
        self.gallery = gallery
        self.gallery_model = gallery_model
        self.model_id = model_id


class Conflict(GalleryError):
    code = "conflict"
    status = 409


class PhotoEnrolledElsewhere(GalleryError):
    """A photo (by sha256) this gallery already holds for another subject: not enrolled
    again, and the other subject is not named (the caller may not know it)."""

    code = "photo_enrolled_elsewhere"
    status = 409

    def __init__(self, subject_id: str) -> None:
        super().__init__(
            f"this photo is already enrolled in this gallery under another subject, so it is "
            f"not enrolled for {subject_id!r}; a photo belongs to one subject"
        )


class NoStoredImages(GalleryError):
    """Re-enrolment needs the enrolment photos, and the source gallery kept none."""

    code = "no_stored_images"
    status = 409

    def __init__(self, gallery: str, faces: int) -> None:
        super().__init__(
            f"gallery {gallery!r} has {faces} enrolled face(s) but no stored enrolment photos: "
            f"photos are kept only while the service runs with FACEGATE_STORE_IMAGES=true, and "
            f"embeddings cannot be converted to another model. Re-enrol the subjects from their "
            f"original photos (POST /v1/galleries/{{gallery}}/subjects/{{id}}/faces), and set "
            f"FACEGATE_STORE_IMAGES=true so that the next model change can be done with "
            f"/v1/galleries/{{gallery}}/reenrol."
        )
        self.gallery = gallery


class InvalidInput(GalleryError, ValueError):
    """A malformed argument (name, cursor, limit); nothing was changed."""

    code = "invalid_input"
    status = 422


class InvalidCursor(InvalidInput):
    """A page cursor that is not one this gallery handed out."""

    code = "invalid_cursor"
    status = 422


class InvalidMetadata(InvalidInput):
    """Metadata that is not a JSON object, too deep, too large or not valid Unicode."""

    code = "invalid_metadata"
    status = 400


class InvalidEmbedding(InvalidInput):
    """Wrong dimension, wrong dtype/shape, non-finite or not L2-normalised."""

    code = "invalid_embedding"
    status = 422


class InvalidExport(InvalidInput):
    """A gallery export file that is not one, is truncated, or was altered."""

    code = "invalid_export"
    status = 422


class ExportModelMismatch(GalleryModelMismatch):
    """An export file of another model than the one served: its embeddings cannot be used."""

    def __init__(self, gallery: str, file_model: str, model_id: str) -> None:
        GalleryError.__init__(
            self,
            f"the export of gallery {gallery!r} holds embeddings of model {file_model!r}, not "
            f"of the served model {model_id!r}; embeddings of different models are never mixed. "
            f"Restore it where {file_model!r} is served, then re-enrol it from its stored photos "
            f"(`facegate gallery reenrol`).",
        )
        self.gallery = gallery
        self.gallery_model = file_model
        self.model_id = model_id


class ClusterNotFound(GalleryError):
    code = "cluster_not_found"
    status = 404
