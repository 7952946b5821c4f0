"""The gallery's typed records: a gallery, a subject, a face, an audit entry.

Shared by the store (``service.gallery``), the API and the client (``service.client``),
so it imports nothing of the service.

Frozen dataclasses, each mapped once from a named store row (``from_row``) and, for the
client, from its JSON object (``from_json``).  ``to_dict`` is the record's JSON object,
the wire form the API answers with; a record also reads as that object (it is a
read-only :class:`~collections.abc.Mapping`: ``record["model_id"]``, ``{**record}``,
``record == {...}``), so code that speaks JSON takes it as it is.  Timestamps are
ISO-8601 UTC strings; metadata and quality are JSON objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


def iso(ts: float) -> str:
    """Epoch seconds as an ISO-8601 UTC string."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


class JsonRecord(Mapping[str, Any]):
    """A record that reads as its JSON object (:meth:`to_dict`)."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass(frozen=True, eq=False)
class GalleryRecord(JsonRecord):
    name: str
    model_id: str
    dim: int | None  # None until the first face (or the creator's model) fixes it
    subjects: int
    faces: int
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_id": self.model_id,
            "dim": self.dim,
            "subjects": self.subjects,
            "faces": self.faces,
            "created_at": self.created_at,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any], subjects: int, faces: int) -> GalleryRecord:
        """``row``: the gallery's ``name, model_id, dim, created_at`` columns."""
        return cls(
            name=row["name"],
            model_id=row["model_id"],
            dim=None if row["dim"] is None else int(row["dim"]),
            subjects=int(subjects),
            faces=int(faces),
            created_at=iso(row["created_at"]),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GalleryRecord:
        return cls(
            name=data["name"],
            model_id=data["model_id"],
            dim=data.get("dim"),
            subjects=int(data.get("subjects", 0)),
            faces=int(data.get("faces", 0)),
            created_at=data["created_at"],
        )


@dataclass(frozen=True, eq=False)
class FaceRecord(JsonRecord):
    face_id: int
    created_at: str
    quality: dict[str, Any]
    subject_id: str | None = None  # given when the face is not read as part of its subject
    reenrolled_from: int | None = None  # the source face of a re-enrolment

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"face_id": self.face_id}
        if self.subject_id is not None:
            body["subject_id"] = self.subject_id
        body["created_at"] = self.created_at
        body["quality"] = self.quality
        if self.reenrolled_from is not None:
            body["reenrolled_from"] = self.reenrolled_from
        return body

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaceRecord:
        source = data.get("reenrolled_from")
        return cls(
            face_id=int(data["face_id"]),
            created_at=data["created_at"],
            quality=dict(data.get("quality") or {}),
            subject_id=data.get("subject_id"),
            reenrolled_from=None if source is None else int(source),
        )


@dataclass(frozen=True, eq=False)
class SubjectRecord(JsonRecord):
    subject_id: str
    metadata: dict[str, Any]
    faces: tuple[FaceRecord, ...]  # by face id
    created_at: str
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject_id": self.subject_id,
            "metadata": self.metadata,
            "faces": [face.to_dict() for face in self.faces],
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_row(
        cls, row: Mapping[str, Any], metadata: dict[str, Any], faces: list[FaceRecord]
    ) -> SubjectRecord:
        """``row``: the subject's ``subject_id, created_at, updated_at`` columns."""
        return cls(
            subject_id=row["subject_id"],
            metadata=metadata,
            faces=tuple(faces),
            created_at=iso(row["created_at"]),
            updated_at=iso(row["updated_at"]),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SubjectRecord:
        return cls(
            subject_id=data["subject_id"],
            metadata=dict(data.get("metadata") or {}),
            faces=tuple(FaceRecord.from_json(f) for f in data.get("faces") or ()),
            created_at=data["created_at"],
            updated_at=data["updated_at"],
        )


@dataclass(frozen=True, eq=False)
class AuditRecord(JsonRecord):
    """One row of the audit log (:mod:`service.gallery.audit`)."""

    id: int
    at: str
    key_id: str
    client: str | None
    action: str
    gallery: str | None
    subject_ids: tuple[str, ...]
    face_ids: tuple[int, ...]
    result: str
    # a refusal's route and reason (null for other actions)
    route: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        body = {
            "id": self.id,
            "at": self.at,
            "key_id": self.key_id,
            "client": self.client,
            "action": self.action,
            "gallery": self.gallery,
            "subject_ids": list(self.subject_ids),
            "face_ids": list(self.face_ids),
            "result": self.result,
            "route": self.route,
            "reason": self.reason,
        }
        return body

    @classmethod
    def from_row(
        cls, row: Mapping[str, Any], subject_ids: list[str], face_ids: list[int]
    ) -> AuditRecord:
        return cls(
            id=int(row["id"]),
            at=iso(row["at"]),
            key_id=row["key_id"],
            client=row["client"],
            action=row["action"],
            gallery=row["gallery"],
            subject_ids=tuple(subject_ids),
            face_ids=tuple(int(f) for f in face_ids),
            result=row["result"],
            route=row.get("route"),
            reason=row.get("reason"),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditRecord:
        return cls(
            id=int(data["id"]),
            at=data["at"],
            key_id=data["key_id"],
            client=data.get("client"),
            action=data["action"],
            gallery=data.get("gallery"),
            subject_ids=tuple(data.get("subject_ids") or ()),
            face_ids=tuple(int(f) for f in data.get("face_ids") or ()),
            result=data["result"],
            route=data.get("route"),
            reason=data.get("reason"),
        )


@dataclass(frozen=True, eq=False)
class SubjectPage(JsonRecord):
    """A page of subjects (``GET /v1/galleries/{g}/subjects``)."""

    subjects: tuple[SubjectRecord, ...]
    next_cursor: str | None  # pass as ``cursor`` for the next page; None at the end

    def to_dict(self) -> dict[str, Any]:
        return {"subjects": [s.to_dict() for s in self.subjects], "next_cursor": self.next_cursor}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SubjectPage:
        return cls(
            tuple(SubjectRecord.from_json(s) for s in data["subjects"]), data.get("next_cursor")
        )


@dataclass(frozen=True, eq=False)
class AuditPage(JsonRecord):
    """A page of audit records (``GET /v1/audit``)."""

    records: tuple[AuditRecord, ...]
    next_cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"records": [r.to_dict() for r in self.records], "next_cursor": self.next_cursor}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditPage:
        return cls(
            tuple(AuditRecord.from_json(r) for r in data["records"]), data.get("next_cursor")
        )
