"""The client's typed answers: verify, identify, detect, embed, enrol, bulk enrolment,
re-enrolment, deletions and the service's info.

Frozen dataclasses, each mapped once from the server's JSON object (``from_json``; the
wire format is docs/api.md's).  Like the records of :mod:`service.records`, an answer
also reads as that JSON object (``answer["match"]``, ``{**answer}``, ``answer == {...}``),
which it keeps as it came.  Imports nothing of the service but the records.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.records import JsonRecord

Point = tuple[float, float]
Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels


@dataclass(frozen=True, eq=False)
class _Answer(JsonRecord):
    """An answer that reads as the JSON object it was mapped from."""

    # the server's JSON object, as it came (not part of the typed fields)
    json: Mapping[str, Any] = field(default_factory=dict, repr=False, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.json)


def _box(value: Any) -> Box | None:
    if value is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in value)
    return (x1, y1, x2, y2)


def _landmarks(value: Any) -> tuple[Point, ...] | None:
    if value is None:
        return None
    return tuple((float(x), float(y)) for x, y in value)


def _timings(value: Any) -> dict[str, float] | None:
    return None if value is None else {k: float(v) for k, v in value.items()}


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def embedding_vector(value: list[float] | str) -> np.ndarray:
    """An embedding of the wire (numbers, or base64 of little-endian float32) as float32."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)


# --- faces ----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Face(_Answer):
    """A detected face: its box, detection score, five landmarks and (detect, embed) quality."""

    box: Box | None  # None for an ``embedding`` probe of identify
    score: float | None
    landmarks: tuple[Point, ...] | None  # eyes, nose tip, mouth corners (x, y)
    quality: dict[str, float] | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Face:
        quality = data.get("quality")
        return cls(
            box=_box(data.get("box")),
            score=_optional_float(data.get("score")),
            landmarks=_landmarks(data.get("landmarks")),
            quality=None if quality is None else dict(quality),
            json=data,
        )


@dataclass(frozen=True, eq=False)
class EmbeddedFace(_Answer):
    """A face of ``/v1/embed``: the detected face and its L2-normalised embedding."""

    face: Face
    embedding: np.ndarray  # float32, shape (embedding_dim,)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EmbeddedFace:
        return cls(
            face=Face.from_json(data), embedding=embedding_vector(data["embedding"]), json=data
        )


@dataclass(frozen=True, eq=False)
class Candidate(_Answer):
    subject_id: str
    similarity: float
    face_id: int | None  # the subject's best-matching face

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Candidate:
        face_id = data.get("face_id")
        return cls(
            subject_id=data["subject_id"],
            similarity=float(data["similarity"]),
            face_id=None if face_id is None else int(face_id),
            json=data,
        )


@dataclass(frozen=True, eq=False)
class IdentifiedFace(_Answer):
    """A probe face of ``/v1/identify``: where it is, its candidates, its match."""

    face: Face  # box, score and landmarks None for an ``embedding`` probe
    candidates: tuple[Candidate, ...]  # best first
    match: str | None  # the best subject at or above the threshold

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IdentifiedFace:
        return cls(
            face=Face.from_json(data),
            candidates=tuple(Candidate.from_json(c) for c in data["candidates"]),
            match=data.get("match"),
            json=data,
        )


# --- the analysis answers -------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SubjectRef(_Answer):
    gallery: str
    subject_id: str
    face_id: int | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SubjectRef:
        face_id = data.get("face_id")
        return cls(
            gallery=data["gallery"],
            subject_id=data["subject_id"],
            face_id=None if face_id is None else int(face_id),
            json=data,
        )


@dataclass(frozen=True, eq=False)
class VerifyAnswer(_Answer):
    """``POST /v1/verify``."""

    match: bool
    similarity: float  # cosine, in [-1, 1]
    threshold: float
    calibrated: bool
    operating_point: str
    model: str
    face1: Face | None  # None for an ``embedding`` probe
    face2: Face | None  # None against a subject
    subject: SubjectRef | None  # the subject verified against
    timings: dict[str, float] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VerifyAnswer:
        face1, face2, subject = data.get("face1"), data.get("face2"), data.get("subject")
        return cls(
            match=bool(data["match"]),
            similarity=float(data["similarity"]),
            threshold=float(data["threshold"]),
            calibrated=bool(data["calibrated"]),
            operating_point=data["operating_point"],
            model=data["model"],
            face1=None if face1 is None else Face.from_json(face1),
            face2=None if face2 is None else Face.from_json(face2),
            subject=None if subject is None else SubjectRef.from_json(subject),
            timings=_timings(data.get("timings")),
            json=data,
        )


@dataclass(frozen=True, eq=False)
class IdentifyAnswer(_Answer):
    """``POST /v1/identify``."""

    gallery: str
    threshold: float
    operating_point: str | None  # None when an explicit threshold was given
    model: str
    faces: tuple[IdentifiedFace, ...]
    timings: dict[str, float] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IdentifyAnswer:
        return cls(
            gallery=data["gallery"],
            threshold=float(data["threshold"]),
            operating_point=data.get("operating_point"),
            model=data["model"],
            faces=tuple(IdentifiedFace.from_json(f) for f in data["faces"]),
            timings=_timings(data.get("timings")),
            json=data,
        )


@dataclass(frozen=True, eq=False)
class DetectAnswer(_Answer):
    """``POST /v1/detect``."""

    width: int  # of the image, in pixels
    height: int
    model: str  # the detection model
    faces: tuple[Face, ...]  # largest first
    timings: dict[str, float] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DetectAnswer:
        return cls(
            width=int(data["image"]["width"]),
            height=int(data["image"]["height"]),
            model=data["model"],
            faces=tuple(Face.from_json(f) for f in data["faces"]),
            timings=_timings(data.get("timings")),
            json=data,
        )


@dataclass(frozen=True, eq=False)
class EmbedAnswer(_Answer):
    """``POST /v1/embed``."""

    width: int
    height: int
    model: str  # the recognition model, as in verify and the galleries
    model_sha256: str | None
    detector: str
    embedding_dim: int
    embedding_format: str  # "float" or "base64" on the wire; ``embedding`` is float32 either way
    faces: tuple[EmbeddedFace, ...]  # largest first
    timings: dict[str, float] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EmbedAnswer:
        return cls(
            width=int(data["image"]["width"]),
            height=int(data["image"]["height"]),
            model=data["model"],
            model_sha256=data.get("model_sha256"),
            detector=data["detector"],
            embedding_dim=int(data["embedding_dim"]),
            embedding_format=data["embedding_format"],
            faces=tuple(EmbeddedFace.from_json(f) for f in data["faces"]),
            timings=_timings(data.get("timings")),
            json=data,
        )


# --- enrolment ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EnrolAnswer(_Answer):
    """``POST /v1/galleries/{g}/subjects/{s}/faces``: the enrolled face."""

    face_id: int
    gallery: str
    subject_id: str
    model: str
    quality: dict[str, Any]
    face: Face  # where the face was found in the photo
    created_at: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EnrolAnswer:
        return cls(
            face_id=int(data["face_id"]),
            gallery=data["gallery"],
            subject_id=data["subject_id"],
            model=data["model"],
            quality=dict(data.get("quality") or {}),
            face=Face.from_json(data["face"]),
            created_at=data.get("created_at"),
            json=data,
        )


@dataclass(frozen=True, eq=False)
class ItemError(_Answer):
    """Why an item (or a face) was refused: the server's error ``code`` and ``message``."""

    code: str
    message: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ItemError:
        return cls(code=str(data["code"]), message=str(data["message"]), json=data)


@dataclass(frozen=True, eq=False)
class BulkItem(_Answer):
    """One item of a bulk enrolment, by its ``index`` in the request."""

    index: int
    subject_id: str | None
    face_id: int | None  # None for a refused item
    created: bool | None  # False: this photo was enrolled before; face_id names that face
    quality: dict[str, Any] | None
    error: ItemError | None  # a refused item's reason

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BulkItem:
        face_id, quality, error = data.get("face_id"), data.get("quality"), data.get("error")
        subject_id = data.get("subject_id")
        return cls(
            index=int(data["index"]),
            subject_id=None if subject_id is None else str(subject_id),
            face_id=None if face_id is None else int(face_id),
            created=data.get("created"),
            quality=None if quality is None else dict(quality),
            error=None if error is None else ItemError.from_json(error),
            json=data,
        )


@dataclass(frozen=True, eq=False)
class BulkAnswer(_Answer):
    """``POST /v1/galleries/{g}/faces``: the counts and every item's answer."""

    gallery: str
    model: str
    enrolled: int
    already_enrolled: int
    refused: int
    # every item's answer, in request order (the wire's ``items``; not ``items``, which is
    # the mapping's method)
    results: tuple[BulkItem, ...]

    @property
    def enrolled_items(self) -> tuple[BulkItem, ...]:
        """The items whose photo is in the gallery (enrolled now or before)."""
        return tuple(item for item in self.results if item.error is None)

    @property
    def errors(self) -> tuple[BulkItem, ...]:
        """The refused items."""
        return tuple(item for item in self.results if item.error is not None)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BulkAnswer:
        return cls(
            gallery=data["gallery"],
            model=data["model"],
            enrolled=int(data["enrolled"]),
            already_enrolled=int(data["already_enrolled"]),
            refused=int(data["refused"]),
            results=tuple(BulkItem.from_json(i) for i in data["items"]),
            json=data,
        )


@dataclass(frozen=True, eq=False)
class SkippedFace(_Answer):
    face_id: int  # the face of the source gallery
    subject_id: str
    code: str  # why the current models refused its photo, e.g. ``no_face``
    message: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SkippedFace:
        return cls(
            face_id=int(data["face_id"]),
            subject_id=data["subject_id"],
            code=data["code"],
            message=data["message"],
            json=data,
        )


@dataclass(frozen=True, eq=False)
class ReenrolReport(_Answer):
    """``POST /v1/galleries/{g}/reenrol``."""

    source: str
    target: str
    model: str
    subjects_copied: int
    subjects_existing: int
    faces_reenrolled: int
    faces_already_reenrolled: int
    faces_skipped: int
    faces_without_image: int
    skipped: tuple[SkippedFace, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReenrolReport:
        return cls(
            source=data["source"],
            target=data["target"],
            model=data["model"],
            subjects_copied=int(data["subjects_copied"]),
            subjects_existing=int(data["subjects_existing"]),
            faces_reenrolled=int(data["faces_reenrolled"]),
            faces_already_reenrolled=int(data["faces_already_reenrolled"]),
            faces_skipped=int(data["faces_skipped"]),
            faces_without_image=int(data["faces_without_image"]),
            skipped=tuple(SkippedFace.from_json(s) for s in data["skipped"]),
            json=data,
        )


# --- deletions and info ---------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Deleted(_Answer):
    """A deletion's answer: what went (``gallery``, ``subject_id``, ``face_id``) and, for a
    subject, how many faces went with it."""

    gallery: str
    subject_id: str | None = None
    face_id: int | None = None
    faces_removed: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Deleted:
        face_id, removed = data.get("face_id"), data.get("faces_removed")
        # a gallery's deletion answers {"deleted": name}; a face's {"gallery", "face_id",
        # "deleted": true}; a subject's {"gallery", "subject_id", "faces_removed"}
        gallery = data["gallery"] if "gallery" in data else data["deleted"]
        return cls(
            gallery=gallery,
            subject_id=data.get("subject_id"),
            face_id=None if face_id is None else int(face_id),
            faces_removed=None if removed is None else int(removed),
            json=data,
        )


@dataclass(frozen=True, eq=False)
class InfoAnswer(_Answer):
    """``GET /v1/info``: the main facts typed; the rest (batching, sync, limits, ...) as the
    JSON object reads it (``info["limits"]``)."""

    version: str | None
    detector: str  # the detection model's id
    recognizer: str  # the recognition model's id
    embedding_dim: int | None
    default_operating_point: str | None
    subjects: int  # in the galleries the caller may touch
    faces: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InfoAnswer:
        models = data["models"]
        recognizer = models["recognizer"]
        galleries = data.get("galleries") or {}
        dim = recognizer.get("embedding_dim")
        return cls(
            version=data.get("version"),
            detector=models["detector"]["id"],
            recognizer=recognizer["id"],
            embedding_dim=None if dim is None else int(dim),
            default_operating_point=recognizer.get("default_operating_point"),
            subjects=int(galleries.get("subjects", 0)),
            faces=int(galleries.get("faces", 0)),
            json=data,
        )
