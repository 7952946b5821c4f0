"""Bulk enrolment: ``POST /v1/galleries/{g}/faces`` and ``facegate gallery import`` run
through :func:`enrol_many`.

The front ends turn their input (a JSON or multipart body; a directory of photos) into
:class:`BulkItem`\\ s; then, once for both: a gallery of another model is refused before
any image work (an absent one is created), each item is checked (its subject id by
:mod:`service.gallery.names`, its metadata by the gallery's limits, exactly one of image
or image URL), URLs are fetched (``fetch``, the service's allow-listed fetcher), the
photos go through the enrolment pipeline together (:mod:`service.bulk`: located photo by
photo, in worker threads in the service, then **one** embedding call) and the accepted
items are committed in **one** transaction.  Every item is answered in order
(:class:`ItemResult`): one bad item does not refuse the others.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from service.bulk import (
    Accepted,
    Located,
    content_sha256,
    embed_located,
    enrol_photos,
    locate_photo,
    merge_embedded,
)
from service.gallery.bulk import check_metadata
from service.gallery.errors import (
    GalleryError,
    GalleryModelMismatch,
    GalleryNotFound,
    InvalidInput,
    PhotoEnrolledElsewhere,
)
from service.gallery.names import check_gallery, check_subject_id
from service.pipeline.errors import PipelineError
from service.pipeline.types import Timings

from .checks import gallery_for_model
from .work import Worker

if TYPE_CHECKING:
    from service.config import Settings
    from service.gallery.service import GalleryService
    from service.pipeline.pipeline import Pipeline

#: ``fetch(index, url)``: the photo's bytes, or the item's refusal ``(code, message)``.
Fetch = Callable[[int, Any], Awaitable["bytes | tuple[str, str]"]]


@dataclass(frozen=True)
class BulkItem:
    """One item as the front end read it; ``error``: refused while reading it."""

    index: int
    subject_id: Any = None
    metadata: Any = None
    image: bytes | None = None
    image_url: Any = None
    error: tuple[str, str] | None = None  # (code, message)


@dataclass(frozen=True)
class ItemResult:
    """One item's answer: its face, or its refusal."""

    index: int
    subject_id: Any
    face_id: int | None = None
    created: bool | None = None  # False: this photo was enrolled before (same sha256)
    quality: dict[str, Any] | None = None
    error: tuple[str, str] | None = None  # (code, message)

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            code, message = self.error
            return {
                "index": self.index,
                "subject_id": self.subject_id,
                "error": {"code": code, "message": message},
            }
        return {
            "index": self.index,
            "face_id": self.face_id,
            "subject_id": self.subject_id,
            "created": self.created,
            "quality": self.quality,
        }


@dataclass(frozen=True)
class BulkEnrolled:
    gallery: str
    model: str
    items: tuple[ItemResult, ...]

    @property
    def enrolled(self) -> int:
        return sum(1 for item in self.items if item.created)

    @property
    def already_enrolled(self) -> int:
        return sum(1 for item in self.items if item.created is False)

    @property
    def refused(self) -> int:
        return sum(1 for item in self.items if item.error is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gallery": self.gallery,
            "model": self.model,
            "enrolled": self.enrolled,
            "already_enrolled": self.already_enrolled,
            "refused": self.refused,
            "items": [item.to_dict() for item in self.items],
        }


def refusal(exc: BaseException) -> tuple[str, str]:
    """``(code, message)`` of a typed refusal (pipeline, gallery, use case)."""
    code = getattr(exc, "code", None)
    if not isinstance(code, str):
        raise exc
    return code, str(exc) or code


def check_item(item: BulkItem) -> None:
    """Refuse an item (not the request) whose fields are wrong."""
    check_subject_id(item.subject_id, f"items[{item.index}].subject_id")
    if item.metadata is not None:
        check_metadata(item.metadata, f"items[{item.index}].metadata")
    if (item.image is None) == (item.image_url is None):
        raise InvalidInput(f"items[{item.index}]: give image or image_url (exactly one)")


async def analyse(
    work: Worker, settings: Settings, photos: list[bytes], timings: Timings
) -> list[Accepted | PipelineError]:
    """Locate the photos' faces (in the service each photo one worker-thread call, bounded
    like every image of the service; in the CLI one after another), then embed all accepted
    faces in one model call."""
    pipeline = work.pipeline
    found: list[Any] = [None] * len(photos)

    async def locate(i: int) -> None:
        try:
            found[i] = await work.run(partial(locate_photo, pipeline, settings, photos[i]))
        except PipelineError as exc:
            found[i] = exc

    start = time.perf_counter()
    if work.threads:
        async with anyio.create_task_group() as group:
            for i in range(len(photos)):
                group.start_soon(locate, i)
    else:
        for i in range(len(photos)):
            await locate(i)
    timings.add("detect", time.perf_counter() - start)
    start = time.perf_counter()
    located = [item for item in found if isinstance(item, Located)]
    accepted = await work.run(partial(embed_located, pipeline, located))
    timings.add("embed", time.perf_counter() - start)
    return merge_embedded(found, accepted)  # type: ignore[return-value]


async def enrol_many(
    *,
    work: Worker,
    settings: Settings,
    gallery: GalleryService,
    name: str,
    items: Sequence[BulkItem],
    timings: Timings,
    fetch: Fetch | None = None,
) -> BulkEnrolled:
    """Enrol ``items`` into gallery ``name`` (see the module docstring); subjects are
    created as needed (with the item's metadata; an existing subject is left as is).  409
    ``model_mismatch`` for another model's gallery, before any image work."""
    with contextlib.suppress(GalleryNotFound):
        await gallery_for_model(work=work, gallery=gallery, name=name, timings=timings)
    errors: dict[int, tuple[str, str]] = {}
    photos: dict[int, bytes] = {}
    for item in items:
        if item.error is not None:
            errors[item.index] = item.error
            continue
        try:
            check_item(item)
        except InvalidInput as exc:
            errors[item.index] = refusal(exc)
            continue
        if item.image is not None:
            photos[item.index] = item.image
    urls = [i for i in items if i.index not in errors and i.index not in photos]
    if urls:
        if fetch is None:
            raise RuntimeError("image_url items need a fetcher")
        fetched = await _gather([fetch(item.index, item.image_url) for item in urls])
        for item, data in zip(urls, fetched, strict=True):
            if isinstance(data, bytes):
                photos[item.index] = data
            else:
                errors[item.index] = data
    todo = [item for item in items if item.index not in errors]
    results = await analyse(work, settings, [photos[item.index] for item in todo], timings)
    accepted: list[tuple[BulkItem, Accepted]] = []
    for item, result in zip(todo, results, strict=True):
        if isinstance(result, Accepted):
            accepted.append((item, result))
        else:
            errors[item.index] = refusal(result)
    written: dict[int, ItemResult] = {}
    if accepted:
        rows = await work.call(
            timings,
            "gallery",
            enrol_photos,
            gallery,
            name,
            work.model_id,
            [(item.subject_id, item.metadata, photos[item.index]) for item, _ in accepted],
            [face for _, face in accepted],
        )
        for (item, face), row in zip(accepted, rows, strict=True):
            if row.get("error"):  # enrolled under another subject: the item's own refusal
                errors[item.index] = refusal(PhotoEnrolledElsewhere(item.subject_id))
            else:
                written[item.index] = ItemResult(
                    item.index, row["subject_id"], row["face_id"], row["created"], face.quality
                )
    answers = tuple(
        ItemResult(item.index, item.subject_id, error=errors[item.index])
        if item.index in errors
        else written[item.index]
        for item in items
    )
    return BulkEnrolled(name, work.model_id, answers)


async def _gather(calls: list[Awaitable[Any]]) -> list[Any]:
    out: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        out[i] = await calls[i]

    async with anyio.create_task_group() as group:
        for i in range(len(calls)):
            group.start_soon(one, i)
    return out


# --- facegate gallery import -----------------------------------------------------------------
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
BATCH = 16


@dataclass
class Report:
    """An import's running tally (read by the progress callback after every batch)."""

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
    """``facegate gallery import DIR --gallery G``: ``DIR/<subject_id>/`` holds each
    subject's photos (``.jpg``, ``.jpeg``, ``.png``, ``.webp``), enrolled batch by batch
    with :func:`enrol_many`; photos whose sha256 the gallery already holds are skipped
    before any model work, so an interrupted import can simply be run again.

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
        self.settings = settings
        self.root = Path(root)
        self.name = check_gallery(name)
        self.model_id = pipeline.model_id
        self.batch = max(1, int(batch))
        self.pipeline = pipeline
        self.workers = workers or os.cpu_count() or 1  # photos located at once
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
        """Enrol one batch; return the sha256 of the photos now enrolled."""
        items = [
            BulkItem(index, subject_id, image=data)
            for index, (subject_id, _, data) in enumerate(todo)
        ]

        async def batch() -> BulkEnrolled:
            # each photo located in a worker thread, at most ``workers`` at once
            limiter = anyio.CapacityLimiter(self.workers)
            return await enrol_many(
                work=Worker(self.pipeline, threads=True, limiter=limiter),
                settings=self.settings,
                gallery=self.gallery,
                name=self.name,
                items=items,
                timings=Timings(),
            )

        result = anyio.run(batch)
        enrolled = set()
        for (subject_id, path, data), answer in zip(todo, result.items, strict=True):
            if answer.error is not None:
                self._refuse(subject_id, path, *answer.error)
                continue
            enrolled.add(content_sha256(data))
            if answer.created:
                self.report.enrolled += 1
                self.report.subjects.add(answer.subject_id)
            else:  # the same photo twice in this batch
                self.report.already_enrolled += 1
        return enrolled
