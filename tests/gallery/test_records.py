"""The typed records, read from a real SQLite store: attributes, their JSON object, and the
client's mapping back from that JSON (the wire form) to the same record."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np

from service.gallery.backends import open_store
from service.records import (
    AuditPage,
    FaceRecord,
    GalleryRecord,
    SubjectPage,
    SubjectRecord,
)

MODEL = "model-a@0000"


def test_store_returns_typed_records_that_read_as_their_json(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    store.migrate()
    try:
        gallery, created = store.create_gallery("g", MODEL, 4)
        assert created and isinstance(gallery, GalleryRecord)
        assert (gallery.name, gallery.model_id, gallery.dim, gallery.faces) == ("g", MODEL, 4, 0)
        assert datetime.fromisoformat(gallery.created_at).utcoffset().total_seconds() == 0
        subject, _ = store.upsert_subject("g", "ann", {"team": "red"}, MODEL)
        assert isinstance(subject, SubjectRecord) and subject.faces == ()
        vector = np.array([1, 0, 0, 0], np.float32)
        face, _ = store.add_face("g", "ann", vector, MODEL, {"det_score": 0.9}, None, 7)
        assert isinstance(face, FaceRecord)
        assert (face.subject_id, face.reenrolled_from, face.quality) == (
            "ann",
            7,
            {"det_score": 0.9},
        )
        again = store.get_subject("g", "ann")
        [stored] = again.faces
        assert stored.face_id == face.face_id and stored.reenrolled_from == 7
        assert stored.subject_id is None  # read as part of its subject
        # the JSON object: what the API answers, and what the record reads as
        body = again.to_dict()
        assert body == {
            "subject_id": "ann",
            "metadata": {"team": "red"},
            "faces": [
                {
                    "face_id": face.face_id,
                    "created_at": stored.created_at,
                    "quality": {"det_score": 0.9},
                    "reenrolled_from": 7,
                }
            ],
            "created_at": again.created_at,
            "updated_at": again.updated_at,
        }
        assert again == body and again["metadata"] == {"team": "red"} and dict(again) == body
        wire = json.loads(json.dumps(body))
        assert SubjectRecord.from_json(wire).to_dict() == body
        assert store.get_gallery("g").faces == 1
        page = SubjectPage.from_json({"subjects": [wire], "next_cursor": None})
        assert page.subjects[0].faces[0].reenrolled_from == 7
        audit = AuditPage.from_json(
            {
                "records": [
                    {
                        "id": 3,
                        "at": gallery.created_at,
                        "key_id": "k",
                        "client": None,
                        "action": "verify",
                        "gallery": "g",
                        "subject_ids": ["ann"],
                        "face_ids": [face.face_id],
                        "result": "ok",
                    }
                ],
                "next_cursor": "3",
            }
        )
        assert audit.records[0].face_ids == (face.face_id,) and audit["next_cursor"] == "3"
    finally:
        store.close()


def test_the_api_schemas_answer_every_field_of_the_records():
    """The REST schemas of a gallery, a subject and a face are the records' fields (a field
    added to a record and not to its schema would be dropped from the answer)."""
    from dataclasses import fields

    from service.api.audit import AuditRecord as AuditSchema
    from service.api.schemas import FaceInfo, Gallery, Subject
    from service.records import AuditRecord

    assert set(Gallery.model_fields) == {f.name for f in fields(GalleryRecord)}
    assert set(Subject.model_fields) == {f.name for f in fields(SubjectRecord)}
    # a face read as part of its subject: face_id, created_at, quality (+ reenrolled_from,
    # an extra field of the schema, present only on a re-enrolled face)
    assert set(FaceInfo.model_fields) | {"subject_id", "reenrolled_from"} == {
        f.name for f in fields(FaceRecord)
    }
    assert FaceInfo.model_config.get("extra") == "allow"
    assert set(AuditSchema.model_fields) <= {f.name for f in fields(AuditRecord)}
