"""Re-enrolment: copy a gallery to a new one for the current models, from its stored photos.

A gallery is bound to the model that produced its embeddings, and embeddings of
one model cannot be turned into another's.  After a recognizer (or detector)
upgrade, :class:`Reenrolment` builds gallery ``target`` for the current model
from gallery ``source``:

* every subject of the source is created in the target with the same
  ``subject_id`` and metadata (an existing target subject is left as it is);
* every source face whose enrolment photo was stored (``FACEGATE_STORE_IMAGES=true``)
  goes through the current pipeline exactly as an upload to
  ``POST /v1/galleries/{g}/subjects/{id}/faces`` does (decode, detect, one face of
  at least ``enroll_min_face_size`` px and ``enroll_min_det_score``, align, embed,
  quality figures) and is enrolled in the target with the same photo.  A photo the
  new models refuse (say a new detector finds no face) is skipped and reported with
  its error code; faces without a stored photo are counted.

Idempotent: each new face records the source face it came from
(``faces.source_face_id``, shown as ``reenrolled_from``), faces already
re-enrolled into the target are skipped (the store refuses a second one under its
writer lock, so concurrent runs cannot duplicate either), and skipped photos are
tried again on the next run.  Every write goes through :class:`GalleryService`
and so through the store, with its change-log entry, like any enrolment.

The work runs in chunks (:meth:`Reenrolment.step`): the REST route runs each
chunk in the thread pool, the CLI in a loop.  A chunk's photos go through
:func:`service.bulk.analyse_photos` (the enrolment pipeline of an upload) and all their
faces are embedded in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from service.bulk import Accepted, analyse_photos
from service.gallery.errors import (
    Conflict,
    GalleryError,
    GalleryNotFound,
    NoStoredImages,
)
from service.gallery.names import check_gallery
from service.gallery.service import GalleryService, check_model

if TYPE_CHECKING:
    from service.config import Settings
    from service.pipeline.pipeline import Pipeline

CHUNK = 16
SUBJECT_PAGE = 500


@dataclass
class _Photo:
    face_id: int
    subject_id: str
    data: bytes


@dataclass(frozen=True)
class SkippedPhoto:
    face_id: int
    subject_id: str
    code: str
    message: str


@dataclass(frozen=True)
class Reenrolled:
    """What a re-enrolment did (:class:`Report`, frozen): the use case's answer."""

    source: str
    target: str
    model: str
    subjects_copied: int
    subjects_existing: int
    faces_reenrolled: int
    faces_already_reenrolled: int
    faces_without_image: int
    skipped: tuple[SkippedPhoto, ...]  # by face id

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "model": self.model,
            "subjects_copied": self.subjects_copied,
            "subjects_existing": self.subjects_existing,
            "faces_reenrolled": self.faces_reenrolled,
            "faces_already_reenrolled": self.faces_already_reenrolled,
            "faces_skipped": len(self.skipped),
            "faces_without_image": self.faces_without_image,
            "skipped": [vars(s) for s in self.skipped],
        }


@dataclass
class Report:
    source: str
    target: str
    model: str
    subjects_copied: int = 0
    subjects_existing: int = 0
    faces_reenrolled: int = 0
    faces_already_reenrolled: int = 0
    faces_without_image: int = 0
    skipped: list[dict] = field(default_factory=list)

    def frozen(self) -> Reenrolled:
        """The report as it stands, frozen (skipped photos by face id)."""
        return Reenrolled(
            source=self.source,
            target=self.target,
            model=self.model,
            subjects_copied=self.subjects_copied,
            subjects_existing=self.subjects_existing,
            faces_reenrolled=self.faces_reenrolled,
            faces_already_reenrolled=self.faces_already_reenrolled,
            faces_without_image=self.faces_without_image,
            skipped=tuple(
                SkippedPhoto(**face) for face in sorted(self.skipped, key=lambda f: f["face_id"])
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return self.frozen().to_dict()


class Reenrolment:
    """One re-enrolment of ``source`` into ``target`` with ``pipeline``'s models.

    ``prepare()`` checks everything and copies the subjects; then ``step()`` until
    it returns False; ``report.to_dict()`` is the answer.  ``run()`` does it all.
    """

    def __init__(
        self,
        gallery: GalleryService,
        pipeline: Pipeline,
        settings: Settings,
        source: str,
        target: str,
        chunk: int = CHUNK,
    ) -> None:
        self.gallery = gallery
        self.pipeline = pipeline
        self.settings = settings
        self.source = check_gallery(source, "source")
        self.target = check_gallery(target)
        self.model_id = pipeline.model_id
        self.chunk = max(1, int(chunk))
        self.report = Report(self.source, self.target, self.model_id)
        self._after = 0
        self._done: set[int] = set()
        self._subjects: set[str] = set()
        self._finished = False

    # --- checks and subjects -----------------------------------------------------
    def prepare(self) -> None:
        """Refuse before writing anything: same gallery (409 ``conflict``), unknown
        source (404), a target of another model (409 ``model_mismatch``), a source
        whose photos were not stored (409 ``no_stored_images``).  Then create the
        target and copy every subject."""
        gallery = self.gallery
        if self.source == self.target:
            raise Conflict(
                f"source and target are the same gallery {self.source!r}; "
                "re-enrol into a new gallery"
            )
        gallery.get_gallery(self.source)  # GalleryNotFound
        try:
            existing = gallery.get_gallery(self.target)
        except GalleryNotFound:
            existing = None
        if existing is not None:
            check_model(self.target, existing.model_id, self.model_id)
        faces, images = gallery.store.image_counts(self.source)
        if faces and not images:
            raise NoStoredImages(self.source, faces)
        gallery.create_gallery(self.target, self.model_id, self.pipeline.dim)
        cursor = None
        while True:
            subjects, cursor = gallery.list_subjects(self.source, SUBJECT_PAGE, cursor)
            for subject in subjects:
                self._copy_subject(subject.subject_id, subject.metadata)
            if cursor is None:
                break
        self._done = gallery.store.reenrolled_sources(self.target)

    def _copy_subject(self, subject_id: str, metadata: dict | None) -> None:
        _, created = self.gallery.upsert_subject(
            self.target, subject_id, metadata or {}, self.model_id, self.pipeline.dim
        )
        if created:
            self.report.subjects_copied += 1
        else:
            self.report.subjects_existing += 1
        self._subjects.add(subject_id)

    # --- faces ---------------------------------------------------------------------
    def step(self) -> bool:
        """Re-enrol the next chunk of source faces; False once every face was seen."""
        if self._finished:
            return False
        rows = self.gallery.store.face_images(self.source, self._after, self.chunk)
        if not rows:
            self._finished = True
            return False
        self._after = rows[-1][0]
        photos = []
        for face_id, subject_id, data in rows:
            if data is None:
                self.report.faces_without_image += 1
            elif face_id in self._done:
                self.report.faces_already_reenrolled += 1
            else:
                photos.append(_Photo(face_id, subject_id, data))
        if photos:
            self._enrol(photos)
        if len(rows) < self.chunk:
            self._finished = True
        return not self._finished

    def run(self) -> dict:
        self.prepare()
        while self.step():
            pass
        return self.report.to_dict()

    def _skip(self, photo: _Photo, exc: Exception) -> None:
        self.report.skipped.append(
            {
                "face_id": photo.face_id,
                "subject_id": photo.subject_id,
                "code": getattr(exc, "code", "error"),
                "message": getattr(exc, "message", None) or str(exc),
            }
        )

    def _enrol(self, photos: list[_Photo]) -> None:
        """The enrolment pipeline of an upload (:func:`service.bulk.analyse_photos`: one
        face over the floor, the quality rules, one embedding call) -> store."""
        results = analyse_photos(self.pipeline, self.settings, [p.data for p in photos])
        for photo, result in zip(photos, results, strict=True):
            if not isinstance(result, Accepted):
                self._skip(photo, result)
                continue
            try:
                self._add(photo, result.embedding, result.quality)
            except Conflict:  # a concurrent run got there first
                self.report.faces_already_reenrolled += 1
            except GalleryError as exc:  # e.g. the subject was deleted meanwhile
                self._skip(photo, exc)

    def _add(self, photo: _Photo, embedding: np.ndarray, quality: dict) -> None:
        gallery = self.gallery
        if photo.subject_id not in self._subjects:  # added to the source after prepare()
            subject = gallery.get_subject(self.source, photo.subject_id)
            self._copy_subject(photo.subject_id, subject.metadata)
        gallery.add_face(
            self.target,
            photo.subject_id,
            embedding,
            self.model_id,
            quality,
            photo.data,
            photo.face_id,
        )
        self._done.add(photo.face_id)
        self.report.faces_reenrolled += 1
