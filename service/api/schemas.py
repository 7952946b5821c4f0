"""Pydantic models of every request option and response body of the REST API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.gallery.names import GALLERY_PATTERN, SUBJECT_PATTERN, GalleryNameStr, SubjectIdStr

#: Gallery names and subject ids: :mod:`service.gallery.names` (no ``.`` or ``..``).
NAME_PATTERN = SUBJECT_PATTERN


#: Longest operating-point name a request may give (the card's names are short).
MAX_POINT_LENGTH = 32


def _not_bool(value: object) -> object:
    """JSON ``true``/``false`` is not a number (pydantic would take ``true`` as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


#: Numbers of request options: JSON numbers or numeric strings (form fields, query), not
#: booleans; floats must be finite.
OptionInt = Annotated[int, BeforeValidator(_not_bool)]
OptionFloat = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
OperatingPoint = Annotated[str, Field(max_length=MAX_POINT_LENGTH)]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- shared pieces -------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. `no_face`")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class Face(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in image pixels")
    score: float = Field(description="detection score")
    landmarks: list[list[float]] = Field(
        description="left eye, right eye, nose tip, left and right mouth corners (x, y)"
    )


# --- verify ------------------------------------------------------------------------------


class VerifyOptions(_Options):
    """Options of ``POST /v1/verify`` (form fields, JSON keys or query parameters)."""

    gallery: GalleryNameStr | None = Field(
        None,
        pattern=GALLERY_PATTERN,
        description="compare image1 with a gallery subject instead of image2",
    )
    subject_id: SubjectIdStr | None = Field(None, pattern=NAME_PATTERN)
    operating_point: OperatingPoint | None = Field(
        None, description="named false-match rate of the model card, e.g. fmr_1e-3"
    )
    multiple_faces: Literal["largest", "refuse"] = Field(
        "largest", description="several faces in an image: use the largest, or refuse (422)"
    )
    embedding: str | None = Field(
        None,
        description="instead of image1: base64 of a little-endian float32 embedding of "
        "the served model (with `model`)",
    )
    model: str | None = Field(
        None,
        description="with `embedding`: the id of the model that made it; must be the served model",
    )


class SubjectRef(BaseModel):
    gallery: str
    subject_id: str
    face_id: int | None = Field(None, description="the subject's best-matching face")


class VerifyResponse(BaseModel):
    match: bool
    similarity: float = Field(description="cosine similarity in [-1, 1]")
    threshold: float
    calibrated: bool = Field(
        description="false: the card has no calibrated threshold for this "
        "operating point and a conservative fallback was used"
    )
    operating_point: str
    model: str = Field(description="id of the recognition model (name@sha256-prefix)")
    face1: Face | None = Field(None, description="absent for an `embedding` probe")
    face2: Face | None = None
    subject: SubjectRef | None = None
    timings: dict[str, float] | None = Field(None, description="milliseconds per stage")


# --- identify ------------------------------------------------------------------------------


class IdentifyOptions(_Options):
    """Options of ``POST /v1/identify``."""

    gallery: GalleryNameStr = Field(pattern=GALLERY_PATTERN)
    top_k: OptionInt = Field(5, ge=1, description="candidates per face, 1..settings.top_k_max")
    threshold: OptionFloat | None = Field(
        None, ge=-1.0, le=1.0, description="explicit cosine threshold for `match`"
    )
    operating_point: OperatingPoint | None = None
    embedding: str | None = Field(
        None,
        description="instead of image: base64 of a little-endian float32 embedding of "
        "the served model (with `model`)",
    )
    model: str | None = Field(
        None,
        description="with `embedding`: the id of the model that made it; must be the served model",
    )


class Candidate(BaseModel):
    subject_id: str
    similarity: float
    face_id: int | None = None


class IdentifiedFace(BaseModel):  # a Face whose box is absent for an `embedding` probe
    box: list[float] | None = Field(None, description="absent for an `embedding` probe")
    score: float | None = None
    landmarks: list[list[float]] | None = None
    candidates: list[Candidate]
    match: str | None = Field(description="best subject at or above the threshold, else null")


class IdentifyResponse(BaseModel):
    gallery: str
    threshold: float
    operating_point: str | None = Field(description="null when an explicit threshold was given")
    model: str
    faces: list[IdentifiedFace]
    timings: dict[str, float] | None = None


# --- detect / embed ----------------------------------------------------------------------


class DetectOptions(_Options):
    """Options of ``POST /v1/detect`` (form fields, JSON keys or query parameters)."""

    max_faces: OptionInt | None = Field(
        None, ge=1, description="answer at most this many faces, largest first"
    )
    multiple_faces: Literal["all", "largest", "refuse"] = Field(
        "all",
        description="several faces: answer all (largest first), only the largest, or "
        "refuse (422 `multiple_faces`)",
    )


class EmbedOptions(DetectOptions):
    """Options of ``POST /v1/embed``."""

    embedding_format: Literal["float", "base64"] = Field(
        "float",
        description="`float`: a list of numbers; `base64`: the little-endian float32 "
        "vector, base64-encoded (several times fewer bytes)",
    )


class FaceQuality(BaseModel):
    det_score: float
    face_width_px: float
    face_height_px: float
    face_size_px: float = Field(description="the smaller of the box's width and height")
    sharpness: float = Field(description="variance of the Laplacian of the aligned crop")
    roll_deg: float = Field(description="angle of the eye line")
    yaw_ratio: float = Field(
        description="nose offset from the eyes' midpoint over the eye "
        "distance (0 frontal, about +-0.5 profile)"
    )


class DetectedFace(Face):
    quality: FaceQuality


class ImageSize(BaseModel):
    width: int
    height: int


class DetectResponse(BaseModel):
    image: ImageSize
    model: str = Field(description="id of the detection model (name@sha256-prefix)")
    faces: list[DetectedFace] = Field(description="largest first; empty when there is no face")
    timings: dict[str, float] | None = None


class EmbeddedFace(DetectedFace):
    embedding: list[float] | str = Field(
        description="L2-normalised embedding: numbers, or base64 of little-endian float32"
    )


class EmbedResponse(BaseModel):
    image: ImageSize
    model: str = Field(
        description="id of the recognition model (name@sha256-prefix), as in "
        "/v1/verify and the galleries"
    )
    model_sha256: str | None = Field(description="full sha256 of the recognition model file")
    detector: str = Field(description="id of the detection model")
    embedding_dim: int
    embedding_format: Literal["float", "base64"]
    faces: list[EmbeddedFace] = Field(description="largest first; empty when there is no face")
    timings: dict[str, float] | None = None


# --- galleries / subjects / faces ---------------------------------------------------


class SubjectCreate(_Options):
    subject_id: SubjectIdStr = Field(
        pattern=NAME_PATTERN, description="client-chosen, unique per gallery"
    )
    metadata: dict[str, Any] | None = None


class SubjectUpdate(_Options):
    metadata: dict[str, Any] = Field(
        description="merged into the subject's metadata; a key set to null is removed"
    )


class FaceInfo(BaseModel):  # service.records.FaceRecord
    model_config = ConfigDict(extra="allow")

    face_id: int
    created_at: str | None = Field(None, description="ISO 8601, UTC")
    quality: dict[str, Any] | None = None
    # and ``reenrolled_from`` (the source face) on a re-enrolled face, absent otherwise


class Subject(BaseModel):  # service.records.SubjectRecord
    model_config = ConfigDict(extra="allow")

    subject_id: str
    metadata: dict[str, Any] | None = None
    faces: list[FaceInfo] = Field(default_factory=list)
    created_at: str | None = Field(None, description="ISO 8601, UTC")
    updated_at: str | None = Field(None, description="ISO 8601, UTC")


class SubjectPage(BaseModel):
    subjects: list[Subject]
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null at the end"
    )


class EnrolledFace(BaseModel):
    model_config = ConfigDict(extra="allow")

    face_id: int
    gallery: str
    subject_id: str
    model: str
    quality: dict[str, Any]
    face: Face
    created_at: str | None = Field(None, description="ISO 8601, UTC")


class SubjectDeleted(BaseModel):
    gallery: str
    subject_id: str
    faces_removed: int


class Gallery(BaseModel):  # service.records.GalleryRecord
    model_config = ConfigDict(extra="allow")

    name: str
    model_id: str | None = None
    dim: int | None = Field(None, description="embedding dimension of the gallery's model")
    subjects: int = 0
    faces: int = 0
    created_at: str | None = Field(None, description="ISO 8601, UTC")


class GalleryList(BaseModel):
    galleries: list[Gallery]


# --- re-enrolment ----------------------------------------------------------------------


class ReenrolRequest(_Options):
    source: GalleryNameStr = Field(
        pattern=GALLERY_PATTERN,
        description="the gallery to re-enrol from (usually an older model's)",
    )


class SkippedFace(BaseModel):
    face_id: int = Field(description="the face of the source gallery")
    subject_id: str
    code: str = Field(description="why the current models refused its photo, e.g. `no_face`")
    message: str


class ReenrolReport(BaseModel):
    source: str
    target: str
    model: str = Field(description="the model the target gallery holds")
    subjects_copied: int = Field(description="subjects created in the target by this call")
    subjects_existing: int = Field(description="source subjects the target already had")
    faces_reenrolled: int = Field(description="faces enrolled in the target by this call")
    faces_already_reenrolled: int = Field(
        description="source faces re-enrolled into the target by an earlier call (not repeated)"
    )
    faces_skipped: int = Field(description="photos the current models refused (see `skipped`)")
    faces_without_image: int = Field(
        description="source faces without a stored photo (enrolled while "
        "FACEGATE_STORE_IMAGES was false): they cannot be re-enrolled"
    )
    skipped: list[SkippedFace]
