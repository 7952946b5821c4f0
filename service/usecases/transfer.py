"""Export and restore a gallery: ``GET /v1/galleries/{g}/export``, ``facegate gallery
export`` and ``facegate gallery restore`` run through here.

The file format and its checks are :mod:`service.gallery.transfer`'s; what lives here is
what the front ends must not differ on: the model sha256 an export names, the model a
restore must match, and the audit record a restore leaves (in the restore's own
transaction, or on its own when the file held no face).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from service.gallery.audit import recording
from service.gallery.transfer import restore, write_export

if TYPE_CHECKING:
    from service.gallery.audit import AuditEntry
    from service.gallery.service import GalleryService
    from service.gallery.store import GalleryStore
    from service.gallery.transfer import Export


@dataclass(frozen=True)
class Exported:
    """The end record of an export file."""

    gallery: str
    subjects: int
    faces: int
    sha256: str  # of the file's lines before the end record


@dataclass(frozen=True)
class Restored:
    """What a restore wrote."""

    gallery: str
    source_gallery: str
    model: str
    subjects: int
    faces: int
    photos: int
    photos_dropped: int
    people: tuple[tuple[str, int], ...]  # (kind, records) in the file's order

    def to_dict(self) -> dict[str, Any]:
        return {
            "gallery": self.gallery,
            "source_gallery": self.source_gallery,
            "model": self.model,
            "subjects": self.subjects,
            "faces": self.faces,
            "photos": self.photos,
            "photos_dropped": self.photos_dropped,
            "people": dict(self.people),
        }


def export_gallery(
    *,
    store: GalleryStore,
    gallery: str,
    out: IO[bytes],
    sha256_of: Callable[[str], str | None] | None = None,
) -> Exported:
    """Write ``gallery``'s export (gzip JSON lines) to ``out``; ``sha256_of(model_id)``
    names the model file's sha256 where it is known.  404 ``gallery_not_found``."""
    end = write_export(store, gallery, out, sha256_of)
    return Exported(gallery, end["subjects"], end["faces"], end["sha256"])


def restore_gallery(
    *,
    gallery: GalleryService,
    export: Export,
    model_id: str,
    model_sha256: str | None,
    target: str | None = None,
    audit: AuditEntry | None = None,
) -> Restored:
    """Write a checked export into the new gallery ``target`` (default: the exported name)
    in one transaction; refuse a file of another model (409 ``model_mismatch``) or a
    gallery that exists.  ``audit`` is recorded with the write."""
    if audit is None:
        report = restore(gallery, export, model_id, model_sha256, target)
    else:
        with recording(audit):
            report = restore(gallery, export, model_id, model_sha256, target)
        if not audit.written:  # no face: no change-log entry carried the audit row
            gallery.store.append_audit([audit])
    return Restored(
        gallery=report["gallery"],
        source_gallery=report["source_gallery"],
        model=report["model"],
        subjects=report["subjects"],
        faces=report["faces"],
        photos=report["photos"],
        photos_dropped=report["photos_dropped"],
        people=tuple(report["people"].items()),
    )
