"""The gallery: a durable store (SQLite or PostgreSQL) with a change log, and FAISS indexes.

Public API::

    gallery = open_gallery(settings)   # nothing runs until start()
    gallery.start()                    # migrate, build/load indexes, follow the log
    ...
    gallery.stop()

See :class:`GalleryService` for the methods and ``errors`` for what they raise.
"""

from __future__ import annotations

from service.gallery.errors import (
    Conflict,
    FaceNotFound,
    GalleryError,
    GalleryModelMismatch,
    GalleryNotFound,
    InvalidEmbedding,
    InvalidInput,
    NoStoredImages,
    SubjectNotFound,
)
from service.gallery.service import GalleryService


def open_gallery(settings) -> GalleryService:
    """A gallery service for ``settings`` (store from ``settings.resolved_store_url``,
    index type from ``settings.index_type``); call ``start()`` before use."""
    return GalleryService(settings)


__all__ = [
    "Conflict",
    "FaceNotFound",
    "GalleryError",
    "GalleryModelMismatch",
    "GalleryNotFound",
    "GalleryService",
    "InvalidEmbedding",
    "InvalidInput",
    "NoStoredImages",
    "SubjectNotFound",
    "open_gallery",
]
