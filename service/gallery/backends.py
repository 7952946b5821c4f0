"""Which :class:`~service.gallery.store.GalleryStore` serves a store URL.

Kept apart from ``store.py`` (the interface) so that the interface imports no backend and
no backend module imports back into a module that imports it: no cycle.  The PostgreSQL
backend is imported only for a ``postgresql://`` URL (``psycopg`` is the optional
``postgres`` extra).
"""

from __future__ import annotations

from service.gallery.sqlite import SQLiteStore
from service.gallery.store import GalleryStore


def open_store(url: str, *, pool_size: int = 8) -> GalleryStore:
    """The store for ``url``: ``sqlite:///path/to/file`` or ``postgresql://...``."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///") :])
    if url.startswith(("postgresql://", "postgres://")):
        from service.gallery.postgres import PostgresStore

        return PostgresStore(url, pool_size=pool_size)
    raise ValueError(f"unsupported store url {url!r}: expected sqlite:///... or postgresql://...")
