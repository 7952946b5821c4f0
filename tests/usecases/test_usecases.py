"""The use cases in-process, on the reference models and real LFW photos (no server).

The expected answers come from LFW's own labels (same person or not) and from the
order the use cases promise to check their preconditions in: a gallery or subject that
is not there is refused before any image work, so an undecodable image never gets that
far.  The inline worker (``facegate verify``) and the threaded one (``POST /v1/verify``)
must give the same answer.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from service.gallery import open_gallery
from service.gallery.errors import (
    Conflict,
    GalleryModelMismatch,
    GalleryNotFound,
    SubjectNotFound,
)
from service.pipeline.decision import UnknownOperatingPoint
from service.pipeline.errors import CorruptImage, MultipleFaces
from service.pipeline.pipeline import Pipeline
from service.pipeline.types import Timings
from service.usecases import galleries
from service.usecases.errors import RequestRefused
from service.usecases.extract import extract_faces
from service.usecases.identify import identify
from service.usecases.verify import verify
from service.usecases.work import Worker
from tests.conftest import GROUP_PHOTO
from tests.usecases.conftest import NOT_AN_IMAGE, lfw


@pytest.fixture(scope="module")
def gallery(settings, pipeline):
    """Gallery ``people``: Colin Powell and Tony Blair, two photos each; ``empty`` has
    subject ``nobody`` without a face."""
    service = open_gallery(settings)
    service.start()
    work = Worker(pipeline, threads=False)
    model, dim = pipeline.model_id, pipeline.dim
    for name, subject, numbers in (
        ("Colin_Powell", "powell", (40, 71)),
        ("Tony_Blair", "blair", (18, 48)),
    ):
        service.upsert_subject("people", subject, None, model, dim)
        for number in numbers:
            found = asyncio.run(
                extract_faces(work=work, image=lfw(name, number), timings=Timings(), embed=True)
            )
            face = found.faces[0]
            service.add_face("people", subject, face.embedding, model, face.quality)
    service.upsert_subject("empty", "nobody", None, model, dim)
    yield service
    service.stop()


def run_verify(pipeline: Pipeline, *, threads: bool = False, **kw):
    return asyncio.run(verify(work=Worker(pipeline, threads=threads), timings=Timings(), **kw))


# LFW pairs.txt, fold 1: two "same" and two "different" pairs
SAME = [(("Abel_Pacheco", 1), ("Abel_Pacheco", 4)), (("Akhmed_Zakayev", 1), ("Akhmed_Zakayev", 3))]
DIFFERENT = [
    (("Abdel_Madi_Shabneh", 1), ("Dean_Barker", 1)),
    (("Abdel_Madi_Shabneh", 1), ("Giancarlo_Fisichella", 1)),
]


@pytest.mark.parametrize(
    ("pair", "same"), [(p, True) for p in SAME] + [(p, False) for p in DIFFERENT]
)
def test_verify_two_photos_follows_the_lfw_labels(pipeline, pair, same):
    (a, b) = pair
    result = run_verify(pipeline, image1=lfw(*a), image2=lfw(*b))
    assert result.decision.match is same
    assert result.operating_point == result.decision.operating_point
    assert result.face1 is not None and result.face2 is not None and result.subject is None
    assert result.model == pipeline.model_id


def test_inline_and_threaded_workers_agree(pipeline):
    """The CLI's worker (inline) and the service's (threads) run the same use case."""
    images = {"image1": lfw("Abel_Pacheco", 1), "image2": lfw("Abel_Pacheco", 4)}
    inline = run_verify(pipeline, threads=False, **images)
    threaded = run_verify(pipeline, threads=True, **images)
    assert inline.similarity == pytest.approx(threaded.similarity, abs=1e-5)
    assert inline.face1 is not None and threaded.face1 is not None
    assert inline.face1.to_dict() == threaded.face1.to_dict()
    assert inline.detected2 == threaded.detected2


def test_verify_against_a_subject_uses_its_best_face(pipeline, gallery):
    result = run_verify(
        pipeline,
        image1=lfw("Colin_Powell", 133),
        gallery=gallery,
        gallery_name="people",
        subject_id="powell",
    )
    faces = gallery.subject_faces("people", "powell", pipeline.model_id)
    probe = pipeline.analyze(lfw("Colin_Powell", 133), "largest").embeddings[0]
    scores = faces.embeddings @ probe
    assert result.subject is not None
    assert result.subject.face_id == int(faces.face_ids[int(np.argmax(scores))])
    assert result.similarity == pytest.approx(float(scores.max()), abs=1e-5)
    assert result.decision.match  # same person (LFW labels)


@pytest.mark.parametrize(
    ("gallery_name", "subject_id", "error"),
    [("absent", "powell", GalleryNotFound), ("people", "absent", SubjectNotFound)],
)
def test_verify_refuses_a_missing_gallery_or_subject_before_image_work(
    pipeline, gallery, gallery_name, subject_id, error
):
    with pytest.raises(error):
        run_verify(
            pipeline,
            image1=NOT_AN_IMAGE,
            gallery=gallery,
            gallery_name=gallery_name,
            subject_id=subject_id,
        )


def test_verify_refuses_a_subject_without_faces_before_image_work(pipeline, gallery):
    with pytest.raises(RequestRefused) as caught:
        run_verify(
            pipeline,
            image1=NOT_AN_IMAGE,
            gallery=gallery,
            gallery_name="empty",
            subject_id="nobody",
        )
    assert (caught.value.status, caught.value.code) == (422, "no_enrolled_face")
    # with the subject's checks passed, the image is the next thing refused
    with pytest.raises(CorruptImage, match="^probe: "):
        run_verify(
            pipeline,
            image1=NOT_AN_IMAGE,
            gallery=gallery,
            gallery_name="people",
            subject_id="powell",
            labels=("probe", "other"),
        )


def test_verify_request_shapes(pipeline):
    photo = lfw("Abel_Pacheco", 1)
    cases = [
        ({"image2": photo}, 422, "missing_field"),
        ({"image1": photo}, 422, "missing_field"),
        ({"image1": photo, "image2": photo, "subject_id": "x"}, 400, "ambiguous_request"),
        ({"image1": photo, "embedding": "AAAA", "model": "m"}, 400, "ambiguous_request"),
        ({"image2": photo, "embedding": "AAAA"}, 422, "missing_field"),
        ({"image2": photo, "embedding": "AAAA", "model": "other"}, 409, "model_mismatch"),
    ]
    for kw, status, code in cases:
        with pytest.raises(RequestRefused) as caught:
            run_verify(pipeline, **kw)
        assert (caught.value.status, caught.value.code) == (status, code), kw
    with pytest.raises(UnknownOperatingPoint):
        run_verify(pipeline, image1=NOT_AN_IMAGE, image2=photo, requested_point="fmr_0")


def test_probe_embedding_scores_as_its_photo(pipeline):
    """An embedding from extract, sent back as a probe, compares exactly as its photo."""
    work = Worker(pipeline, threads=False)
    found = asyncio.run(
        extract_faces(work=work, image=lfw("Abel_Pacheco", 1), timings=Timings(), embed=True)
    )
    vector = np.asarray(found.faces[0].embedding, dtype="<f4")
    text = base64.b64encode(vector.tobytes()).decode()
    other = lfw("Abel_Pacheco", 4)
    by_probe = run_verify(pipeline, embedding=text, model=pipeline.model_id, image2=other)
    by_photo = run_verify(pipeline, image1=lfw("Abel_Pacheco", 1), image2=other)
    assert by_probe.face1 is None and by_probe.detected1 == 0
    assert by_probe.similarity == pytest.approx(by_photo.similarity, abs=1e-5)


def test_identify_names_the_enrolled_person(pipeline, gallery):
    result = asyncio.run(
        identify(
            work=Worker(pipeline, threads=False),
            gallery=gallery,
            timings=Timings(),
            gallery_name="people",
            image=lfw("Tony_Blair", 64),
            top_k=2,
            top_k_max=10,
        )
    )
    [face] = result.faces
    assert face.match == "blair"
    assert [c.subject_id for c in face.candidates] == ["blair", "powell"]
    assert face.candidates[0].similarity > face.candidates[1].similarity
    assert result.threshold.operating_point is not None


def test_identify_checks_before_image_work(pipeline, gallery):
    def attempt(**kw):
        asyncio.run(
            identify(
                work=Worker(pipeline, threads=False),
                gallery=gallery,
                timings=Timings(),
                image=NOT_AN_IMAGE,
                top_k_max=10,
                **kw,
            )
        )

    with pytest.raises(GalleryNotFound):
        attempt(gallery_name="absent")
    with pytest.raises(RequestRefused, match="top_k"):
        attempt(gallery_name="people", top_k=11)
    with pytest.raises(RequestRefused, match="not both"):
        attempt(gallery_name="people", threshold=0.3, requested_point="fmr_1e-3")
    with pytest.raises(CorruptImage):
        attempt(gallery_name="people")


def test_extract_keeps_the_faces_the_policy_asks_for(pipeline):
    work = Worker(pipeline, threads=False)
    photo = GROUP_PHOTO.read_bytes()
    found = asyncio.run(extract_faces(work=work, image=photo, timings=Timings(), limit=2))
    assert found.detected > 2 and len(found.faces) == 2
    assert found.faces[0].detection.area >= found.faces[1].detection.area  # largest first
    assert all(face.embedding is None for face in found.faces)
    with pytest.raises(MultipleFaces):
        asyncio.run(extract_faces(work=work, image=photo, timings=Timings(), policy="refuse"))
    embedded = asyncio.run(
        extract_faces(work=work, image=photo, timings=Timings(), limit=2, embed=True)
    )
    norms = [float(np.linalg.norm(face.embedding)) for face in embedded.faces]
    assert norms == pytest.approx([1.0, 1.0], abs=1e-4)


def run_gallery(fn, pipeline, gallery, **kw):
    return asyncio.run(
        fn(work=Worker(pipeline, threads=False), gallery=gallery, timings=Timings(), **kw)
    )


def test_create_gallery_and_subject_say_whether_they_created(pipeline, gallery):
    first = run_gallery(galleries.create_gallery, pipeline, gallery, name="fresh")
    again = run_gallery(galleries.create_gallery, pipeline, gallery, name="fresh")
    assert (first.created, again.created) == (True, False)
    assert first.record["model_id"] == pipeline.model_id
    made = run_gallery(
        galleries.create_subject,
        pipeline,
        gallery,
        name="fresh",
        subject_id="ann",
        metadata={"k": 1},
    )
    kept = run_gallery(
        galleries.create_subject, pipeline, gallery, name="fresh", subject_id="ann", metadata={}
    )
    assert (made.created, kept.created) == (True, False)
    assert kept.record["metadata"] == {"k": 1}  # an existing subject is left as it is


def test_enrol_checks_gallery_and_subject_before_image_work(pipeline, gallery, settings):
    gallery.create_gallery("other-model", "someone-else@0000", 128)
    for name, subject_id, error in [
        ("absent", "powell", GalleryNotFound),
        ("people", "absent", SubjectNotFound),
        ("other-model", "powell", GalleryModelMismatch),
    ]:
        with pytest.raises(error):
            run_gallery(
                galleries.enrol_face,
                pipeline,
                gallery,
                settings=settings,
                name=name,
                subject_id=subject_id,
                image=NOT_AN_IMAGE,
            )
    with pytest.raises(MultipleFaces):  # enrolment wants exactly one face
        run_gallery(
            galleries.enrol_face,
            pipeline,
            gallery,
            settings=settings,
            name="people",
            subject_id="powell",
            image=GROUP_PHOTO.read_bytes(),
        )


def test_enrol_stores_the_face_it_found(pipeline, gallery, settings):
    before = gallery.subject_faces("people", "blair", pipeline.model_id)
    face = run_gallery(
        galleries.enrol_face,
        pipeline,
        gallery,
        settings=settings,
        name="people",
        subject_id="blair",
        image=lfw("Tony_Blair", 86),
    )
    after = gallery.subject_faces("people", "blair", pipeline.model_id)
    assert face.record["face_id"] in set(after.face_ids) - set(before.face_ids)
    assert face.model == pipeline.model_id and face.quality["det_score"] > 0.5
    assert face.quality["face_size_px"] >= settings.enroll_min_face_size


def test_reenrol_into_itself_is_refused(pipeline, gallery, settings):
    refused: list[str] = []
    with pytest.raises(Conflict):
        run_gallery(
            galleries.reenrol,
            pipeline,
            gallery,
            settings=settings,
            source="people",
            target="people",
            allow_gallery=refused.append,
        )
    assert refused == ["people"]  # the caller was asked about the source first
