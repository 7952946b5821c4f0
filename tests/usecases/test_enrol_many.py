"""Bulk enrolment in-process (the use case under ``POST /v1/galleries/{g}/faces`` and
``facegate gallery import``), on the reference models and real LFW photos.

The expected answers come from the bulk contract (README, bulk enrolment): every item is
answered in order, one bad item refuses only itself, a photo enrolled before answers
``created: false`` with its face, another subject's photo is refused, a subject whose
every item is refused is not created, and another model's gallery is refused before
any image work.
"""

from __future__ import annotations

import asyncio

import pytest

from service.gallery import open_gallery
from service.gallery.errors import GalleryModelMismatch, SubjectNotFound
from service.pipeline.types import Timings
from service.usecases.enrol_many import BulkItem, enrol_many
from service.usecases.work import Worker
from tests.conftest import GROUP_PHOTO
from tests.usecases.conftest import NOT_AN_IMAGE, lfw


@pytest.fixture(scope="module")
def gallery(settings):
    service = open_gallery(settings)
    service.start()
    yield service
    service.stop()


def run(pipeline, settings, gallery, name, items, *, threads=False, fetch=None):
    return asyncio.run(
        enrol_many(
            work=Worker(pipeline, threads=threads),
            settings=settings,
            gallery=gallery,
            name=name,
            items=items,
            timings=Timings(),
            fetch=fetch,
        )
    )


def test_each_item_is_answered_in_order(pipeline, settings, gallery):
    powell = lfw("Colin_Powell", 40)
    items = [
        BulkItem(0, "powell", {"name": "Colin Powell"}, image=powell),
        BulkItem(1, "powell", image=powell),  # the same photo again
        BulkItem(2, "..", image=lfw("Tony_Blair", 18)),  # not a subject id
        BulkItem(3, "blair"),  # neither image nor image_url
        BulkItem(4, "group", image=GROUP_PHOTO.read_bytes()),  # several faces
        BulkItem(5, "broken", image=NOT_AN_IMAGE),
        BulkItem(6, "parsed", error=("invalid_base64", "items[6].image must be base64")),
    ]
    result = run(pipeline, settings, gallery, "bulk", items, threads=True)
    answers = result.items
    assert [a.index for a in answers] == list(range(7))
    assert (answers[0].created, answers[1].created) == (True, False)
    assert answers[1].face_id == answers[0].face_id
    assert answers[0].quality is not None and answers[0].quality["det_score"] > 0.5
    codes = [a.error[0] if a.error else None for a in answers]
    assert codes[:2] == [None, None]
    assert codes[2:] == [
        "invalid_input",
        "invalid_input",
        "multiple_faces",
        "corrupt_image",
        "invalid_base64",
    ]
    assert (result.enrolled, result.already_enrolled, result.refused) == (1, 1, 5)
    body = result.to_dict()
    assert body["model"] == pipeline.model_id and len(body["items"]) == 7
    assert body["items"][6] == {
        "index": 6,
        "subject_id": "parsed",
        "error": {"code": "invalid_base64", "message": "items[6].image must be base64"},
    }
    faces = gallery.subject_faces("bulk", "powell", pipeline.model_id)
    assert list(faces.face_ids) == [answers[0].face_id]
    assert gallery.get_subject("bulk", "powell").metadata == {"name": "Colin Powell"}
    for refused in ("group", "broken", "parsed"):  # every item refused: no subject
        with pytest.raises(SubjectNotFound):
            gallery.get_subject("bulk", refused)


def test_another_subjects_photo_is_refused_and_urls_go_through_fetch(pipeline, settings, gallery):
    blair = lfw("Tony_Blair", 48)
    asked = []

    async def fetch(index, url):
        asked.append((index, url))
        return blair if url == "https://photos.example/blair.jpg" else ("fetch_failed", "no")

    first = run(
        pipeline,
        settings,
        gallery,
        "urls",
        [
            BulkItem(0, "blair", image_url="https://photos.example/blair.jpg"),
            BulkItem(1, "nobody", image_url="https://photos.example/missing.jpg"),
        ],
        fetch=fetch,
    )
    assert asked == [
        (0, "https://photos.example/blair.jpg"),
        (1, "https://photos.example/missing.jpg"),
    ]
    assert first.items[0].created is True and first.items[1].error == ("fetch_failed", "no")
    again = run(pipeline, settings, gallery, "urls", [BulkItem(0, "impostor", image=blair)])
    assert again.items[0].error is not None
    assert again.items[0].error[0] == "photo_enrolled_elsewhere"
    assert "blair" not in again.items[0].error[1]  # the other subject is not named
    with pytest.raises(SubjectNotFound):
        gallery.get_subject("urls", "impostor")


def test_another_models_gallery_is_refused_before_image_work(pipeline, settings, gallery):
    gallery.create_gallery("foreign", "someone-else@0000", 128)
    with pytest.raises(GalleryModelMismatch):
        run(pipeline, settings, gallery, "foreign", [BulkItem(0, "x", image=NOT_AN_IMAGE)])
