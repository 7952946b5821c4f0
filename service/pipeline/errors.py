"""Typed pipeline errors: each carries the HTTP ``status`` and machine ``code`` it maps to.

The HTTP layer turns any ``PipelineError`` into ``{"error": {"code", "message"}}``
with ``status`` in one place; nothing else needs to know the mapping.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: a request's image or face cannot be processed."""

    code: str = "pipeline_error"
    status: int = 400

    def __init__(self, message: str | None = None):
        super().__init__(message or self.__class__.__doc__ or self.code)

    @property
    def message(self) -> str:
        return str(self)


class EmptyImage(PipelineError):
    """The image is empty (zero bytes)."""

    code, status = "empty_image", 400


class ImageTooLarge(PipelineError):
    """The image is larger than the byte limit."""

    code, status = "image_too_large", 413


class TooManyPixels(PipelineError):
    """The image's dimensions exceed the pixel limit (possible decompression bomb)."""

    code, status = "too_many_pixels", 413


class DecodeTooLarge(PipelineError):
    """Decoding the image would take more memory than the limit (bit depth x channels x pixels)."""

    code, status = "decode_too_large", 413


class UnsupportedImageType(PipelineError):
    """The data is not a JPEG, PNG, WebP or BMP image."""

    code, status = "unsupported_image_type", 415


class CorruptImage(PipelineError):
    """The image is truncated or cannot be decoded."""

    code, status = "corrupt_image", 400


class NoFace(PipelineError):
    """No face was found in the image."""

    code, status = "no_face", 422


class MultipleFaces(PipelineError):
    """More than one face was found where exactly one is required."""

    code, status = "multiple_faces", 422


class FaceTooSmall(PipelineError):
    """The face is smaller than the minimum size required."""

    code, status = "face_too_small", 422


class LowQualityFace(PipelineError):
    """The face's detection score is below the quality required."""

    code, status = "low_quality_face", 422


class BlurredFace(PipelineError):
    """The aligned face is less sharp than the enrolment sharpness floor (blurred)."""

    code, status = "blurred_face", 422


class FaceTurned(PipelineError):
    """The face is turned sideways (yaw) beyond the enrolment limit."""

    code, status = "face_turned", 422


class FaceTilted(PipelineError):
    """The face is tilted (roll) beyond the enrolment limit."""

    code, status = "face_tilted", 422
