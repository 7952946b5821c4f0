"""Export, restore and audit queries in-process, on the reference models and LFW photos.

The expected figures come from what the fixture enrolled (two subjects, three faces) and
from the export format's promise that embeddings come back exactly.
"""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime

import numpy as np
import pytest

from service.gallery import open_gallery
from service.gallery.audit import AuditEntry
from service.gallery.errors import Conflict, ExportModelMismatch, GalleryNotFound
from service.gallery.transfer import read_export
from service.pipeline.types import Timings
from service.usecases.audit import AuditQuery, audit_query, read_audit
from service.usecases.errors import RequestRefused
from service.usecases.extract import extract_faces
from service.usecases.transfer import export_gallery, restore_gallery
from service.usecases.work import Worker
from tests.conftest import LFW

ENROLLED = {"powell": ("Colin_Powell", (40, 71)), "blair": ("Tony_Blair", (18,))}


@pytest.fixture(scope="module")
def gallery(settings, pipeline):
    service = open_gallery(settings)
    service.start()
    work = Worker(pipeline, threads=False)
    for subject, (name, numbers) in ENROLLED.items():
        service.upsert_subject("people", subject, {"name": name}, pipeline.model_id, pipeline.dim)
        for number in numbers:
            image = (LFW / "images" / name / f"{name}_{number:04d}.jpg").read_bytes()
            found = asyncio.run(
                extract_faces(work=work, image=image, timings=Timings(), embed=True)
            )
            face = found.faces[0]
            service.add_face("people", subject, face.embedding, pipeline.model_id, face.quality)
    yield service
    service.stop()


def exported(gallery, name: str) -> bytes:
    out = io.BytesIO()
    end = export_gallery(store=gallery.store, gallery=name, out=out)
    assert (end.gallery, end.subjects, end.faces) == (name, 2, 3)
    assert len(end.sha256) == 64
    return out.getvalue()


def test_export_then_restore_gives_back_the_same_faces(gallery, pipeline, settings):
    export = read_export(io.BytesIO(exported(gallery, "people")), settings.max_image_bytes)
    entry = AuditEntry("restore", key_id="cli", client="local", gallery="copy")
    restored = restore_gallery(
        gallery=gallery,
        export=export,
        model_id=pipeline.model_id,
        model_sha256=None,
        target="copy",
        audit=entry,
    )
    assert (restored.gallery, restored.source_gallery) == ("copy", "people")
    assert (restored.subjects, restored.faces, restored.model) == (2, 3, pipeline.model_id)
    assert restored.to_dict()["people"] == dict(restored.people)
    for subject in ENROLLED:
        source = gallery.subject_faces("people", subject, pipeline.model_id)
        copy = gallery.subject_faces("copy", subject, pipeline.model_id)
        assert np.array_equal(source.embeddings, copy.embeddings)  # exact float32
    page = read_audit(store=gallery.store, query=audit_query(action="restore", gallery="copy"))
    assert [(r.action, r.key_id, r.gallery) for r in page.records] == [("restore", "cli", "copy")]
    with pytest.raises(Conflict):  # the target must not exist: nothing is merged
        restore_gallery(
            gallery=gallery,
            export=export,
            model_id=pipeline.model_id,
            model_sha256=None,
            target="copy",
        )


def test_restore_refuses_another_models_file(gallery, settings):
    export = read_export(io.BytesIO(exported(gallery, "people")), settings.max_image_bytes)
    with pytest.raises(ExportModelMismatch):
        restore_gallery(
            gallery=gallery,
            export=export,
            model_id="other@0000",
            model_sha256=None,
            target="elsewhere",
        )
    with pytest.raises(GalleryNotFound):
        gallery.get_gallery("elsewhere")


def test_export_of_an_unknown_gallery_is_refused(gallery):
    with pytest.raises(GalleryNotFound):
        export_gallery(store=gallery.store, gallery="absent", out=io.BytesIO())


def test_audit_query_refuses_bad_fields_before_reading():
    refusals = [
        ({"action": "steal"}, "validation_error"),
        ({"cursor": "12a"}, "invalid_cursor"),
        ({"cursor": str(2**63)}, "invalid_cursor"),
        ({"since": datetime(2026, 1, 1)}, "validation_error"),  # no time zone
    ]
    for fields, code in refusals:
        with pytest.raises(RequestRefused) as caught:
            audit_query(**fields)
        assert (caught.value.status, caught.value.code) == (422, code)
    asked: list[str] = []
    query = audit_query(gallery="g", cursor="7", allow_gallery=asked.append)
    assert asked == ["g"] and (query.after, query.gallery) == (7, "g")


def test_audit_pages_follow_the_cursor(gallery):
    gallery.store.append_audit(
        [AuditEntry("export", key_id=f"k{i}", gallery="paged") for i in range(3)]
    )
    since = audit_query(since=datetime(2000, 1, 1, tzinfo=UTC)).since
    first = read_audit(store=gallery.store, query=AuditQuery(gallery="paged", since=since, limit=2))
    assert [r.key_id for r in first.records] == ["k0", "k1"] and first.next_cursor is not None
    rest = read_audit(
        store=gallery.store,
        query=audit_query(gallery="paged", cursor=first.next_cursor),
    )
    assert [r.key_id for r in rest.records] == ["k2"] and rest.next_cursor is None
    scoped = read_audit(store=gallery.store, query=AuditQuery(galleries=frozenset({"other"})))
    assert scoped.records == ()
