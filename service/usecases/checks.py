"""The preconditions use cases check once, before any image work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.gallery.service import check_model
from service.pipeline.types import Timings

from .work import Worker

if TYPE_CHECKING:
    from service.gallery.service import GalleryService
    from service.records import GalleryRecord


async def gallery_for_model(
    *, work: Worker, gallery: GalleryService, name: str, timings: Timings
) -> GalleryRecord:
    """The gallery's record; ``GalleryNotFound`` (404) if unknown, ``GalleryModelMismatch``
    (409) if it holds another model's embeddings than the worker's pipeline makes."""
    info = await work.call(timings, "search", gallery.get_gallery, name)
    if info.model_id is not None:
        check_model(name, info.model_id, work.model_id)
    return info
