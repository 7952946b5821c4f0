"""Bulk enrolment: many photos through the pipeline in batches, then one store transaction.

:func:`analyse_photos` runs photos as ``POST /v1/galleries/{g}/subjects/{id}/faces`` runs
one (decode, detect, exactly one face over the enrolment floor, align, the enrolment
quality rules), locating faces photo by photo (in several threads when asked) and embedding
every accepted face in **one** model call; re-enrolment (:mod:`service.reenrol`) uses it
too.  :func:`enrol_photos` adds the accepted faces to a gallery with
:func:`service.gallery.bulk.write_many` (one transaction; a photo already enrolled into
the gallery, by sha256 of its bytes, is not added twice).

:class:`DirectoryImport` is ``facegate gallery import DIR --gallery G``: ``DIR/<subject_id>/``
holds each subject's photos (``.jpg``, ``.jpeg``, ``.png``, ``.webp``); photos whose sha256
the gallery already holds are skipped before any model work, so an interrupted import can
simply be run again.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.gallery.bulk import write_many
from service.gallery.errors import (
    GalleryError,
    GalleryModelMismatch,
    GalleryNotFound,
    PhotoEnrolledElsewhere,
)
from service.gallery.names import check_gallery, check_subject_id
from service.gallery.store import NewFace, NewSubject
from service.pipeline.errors import PipelineError
from service.pipeline.faces import face_quality
from service.pipeline.quality import check_enrol_quality
from service.pipeline.types import Detection

if TYPE_CHECKING:
    from service.config import Settings
    from service.gallery.service import GalleryService
    from service.pipeline.pipeline import Pipeline

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
BATCH = 16


@dataclass
class Located:
    """One photo's enrolment face, aligned, before embedding."""

    detection: Detection
    crop: np.ndarray
    quality: dict


@dataclass
class Accepted:
    """One photo's face, ready to enrol."""

    embedding: np.ndarray
    quality: dict
    detection: Detection


def locate_photo(pipeline, settings, data: bytes) -> Located:
    """decode -> detect -> exactly one face over the enrolment floor -> align -> the
    enrolment quality rules; raises the ``PipelineError`` that refuses the photo."""
    found = pipeline.locate(data, "enrol")
    detection, crop = found.detections[0], found.crops[0]
    quality = face_quality(detection, crop)
    check_enrol_quality(quality, settings)
    return Located(detection, crop, quality)


def embed_located(pipeline, located: list[Located]) -> list[Accepted]:
    """Embed every located face in one model call."""
    if not located:
        return []
    embeddings = pipeline.embed(np.stack([face.crop for face in located]))
    return [
        Accepted(np.asarray(embedding, dtype=np.float32), face.quality, face.detection)
        for face, embedding in zip(located, embeddings, strict=True)
    ]


def _try_locate(pipeline, settings, data: bytes) -> Located | PipelineError:
    try:
        return locate_photo(pipeline, settings, data)
    except PipelineError as exc:
        return exc


def analyse_photos(
    pipeline, settings, photos: list[bytes], workers: int = 1
) -> list[Accepted | Exception]:
    """Per photo, its enrolment face or the error that refuses it (``PipelineError``).

    Photos are located in ``workers`` threads, one photo at a time each (on CPU the
    detector's batch call measured no faster than one image at a time, see BENCHMARKS.md),
    and every accepted face is embedded in one model call."""
    if workers > 1 and len(photos) > 1:
        with ThreadPoolExecutor(min(workers, len(photos))) as pool:
            found = list(pool.map(lambda data: _try_locate(pipeline, settings, data), photos))
    else:
        found = [_try_locate(pipeline, settings, data) for data in photos]
    return merge_embedded(
        found, embed_located(pipeline, [f for f in found if isinstance(f, Located)])
    )


def merge_embedded(found: list, accepted: list[Accepted]) -> list[Accepted | Exception]:
    """``found`` (``Located`` or an error per photo) with each ``Located`` replaced, in
    order, by its ``Accepted`` from :func:`embed_located`."""
    faces = iter(accepted)
    return [next(faces) if isinstance(item, Located) else item for item in found]


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def enrol_photos(
    gallery: GalleryService,
    name: str,
    model_id: str,
    items: Sequence[tuple[str, dict | None, bytes]],
    accepted: list[Accepted],
) -> list[dict]:
    """Add ``accepted[i]`` for ``items[i] = (subject_id, metadata, photo)`` in one transaction;
    subjects are created as needed (with ``metadata``; an existing subject is left as is),
    only for items that add a face.  Returns per item ``{face_id, subject_id, created}``, or
    with ``error: "photo_enrolled_elsewhere"`` for a photo another subject holds."""
    subjects: dict[str, NewSubject] = {}
    for subject_id, metadata, _ in items:
        subjects.setdefault(subject_id, NewSubject(subject_id, metadata))
    faces = [
        NewFace(subject_id, face.embedding, face.quality, data, content_sha256(data))
        for (subject_id, _, data), face in zip(items, accepted, strict=True)
    ]
    return write_many(gallery, name, model_id, list(subjects.values()), faces, only_with_faces=True)


# --- facegate gallery import -----------------------------------------------------------------
@dataclass
class Report:
    gallery: str
    model: str
    photos: int = 0
    enrolled: int = 0
    already_enrolled: int = 0
    subjects: set[str] = field(default_factory=set)
    refused: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        rate = self.enrolled / self.seconds if self.seconds > 0 else 0.0
        return {
            "gallery": self.gallery,
            "model": self.model,
            "photos": self.photos,
            "enrolled": self.enrolled,
            "already_enrolled": self.already_enrolled,
            "refused": len(self.refused),
            "subjects": len(self.subjects),
            "seconds": round(self.seconds, 3),
            "faces_per_s": round(rate, 2),
            "refusals": self.refused,
        }


def scan_directory(root: Path) -> tuple[list[tuple[str, Path]], list[dict]]:
    """``(subject_id, photo path)`` for every photo under ``root/<subject_id>/``, sorted, and
    the refusals of sub-directories whose name is not a valid subject id."""
    photos, refused = [], []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        try:
            subject_id = check_subject_id(folder.name)
        except GalleryError as exc:
            refused.append(
                {
                    "path": str(folder),
                    "subject_id": folder.name,
                    "code": exc.code,
                    "message": exc.message,
                }
            )
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in PHOTO_SUFFIXES:
                photos.append((subject_id, path))
    return photos, refused


class DirectoryImport:
    """Import ``root`` into gallery ``name`` with ``pipeline``'s models (see module docstring).

    ``run(progress)`` calls ``progress(photos_done, report)`` after every batch."""

    def __init__(
        self,
        gallery: GalleryService,
        pipeline: Pipeline,
        settings: Settings,
        root: Path,
        name: str,
        batch: int = BATCH,
        workers: int | None = None,
    ) -> None:
        self.gallery = gallery
        self.pipeline = pipeline
        self.settings = settings
        self.root = Path(root)
        self.name = check_gallery(name)
        self.model_id = pipeline.model_id
        self.batch = max(1, int(batch))
        self.workers = workers or os.cpu_count() or 1
        self.report = Report(self.name, self.model_id)
        self.photos, refused = scan_directory(self.root)
        self.report.photos = len(self.photos)
        self.report.refused.extend(refused)

    def check(self) -> None:
        """Refuse a gallery of another model before any work (409 ``model_mismatch``)."""
        try:
            info = self.gallery.get_gallery(self.name)
        except GalleryNotFound:
            return
        if info["model_id"] != self.model_id:
            raise GalleryModelMismatch(self.name, info["model_id"], self.model_id)

    def _batches(self) -> Iterator[list[tuple[str, Path, bytes]]]:
        for start in range(0, len(self.photos), self.batch):
            chunk = []
            for subject_id, path in self.photos[start : start + self.batch]:
                try:
                    chunk.append((subject_id, path, path.read_bytes()))
                except OSError as exc:
                    self._refuse(subject_id, path, "unreadable", str(exc))
            yield chunk

    def _refuse(self, subject_id: str, path: Path, code: str, message: str) -> None:
        self.report.refused.append(
            {"path": str(path), "subject_id": subject_id, "code": code, "message": message}
        )

    def run(self, progress: Callable[[int, Report], None] | None = None) -> dict:
        self.check()
        began = time.perf_counter()
        done = self.gallery.store.content_hashes(self.name)
        seen = 0
        for chunk in self._batches():
            todo = []
            for subject_id, path, data in chunk:
                digest = content_sha256(data)
                if digest in done:
                    self.report.already_enrolled += 1
                else:
                    todo.append((subject_id, path, data))
            if todo:
                done.update(self._enrol(todo))
            seen += len(chunk)
            self.report.seconds = time.perf_counter() - began
            if progress is not None:
                progress(seen, self.report)
        self.report.seconds = time.perf_counter() - began
        return self.report.to_dict()

    def _enrol(self, todo: list[tuple[str, Path, bytes]]) -> set[str]:
        """Analyse and enrol one batch; return the sha256 of the photos now enrolled."""
        results = analyse_photos(
            self.pipeline, self.settings, [data for _, _, data in todo], self.workers
        )
        items, accepted, paths = [], [], []
        for (subject_id, path, data), result in zip(todo, results, strict=True):
            if isinstance(result, Accepted):
                items.append((subject_id, None, data))
                accepted.append(result)
                paths.append(path)
            else:
                self._refuse(
                    subject_id,
                    path,
                    getattr(result, "code", "error"),
                    getattr(result, "message", None) or str(result),
                )
        if not items:
            return set()
        rows = enrol_photos(self.gallery, self.name, self.model_id, items, accepted)
        for written, path in zip(rows, paths, strict=True):
            if written.get("error"):  # the same photo under two subjects
                refusal = PhotoEnrolledElsewhere(written["subject_id"])
                self._refuse(written["subject_id"], path, refusal.code, refusal.message)
            elif written["created"]:
                self.report.enrolled += 1
                self.report.subjects.add(written["subject_id"])
            else:  # the same photo twice in this batch
                self.report.already_enrolled += 1
        return {content_sha256(data) for _, _, data in items}
