"""Gallery export and restore: one self-describing gzip file of JSON lines.

The format (``facegate-gallery``, version 1), one JSON object per line:

1. ``{"type": "header", "format": "facegate-gallery", "version": 1, "gallery", "model_id",
   "model_sha256" (the recognizer file's sha256, null when unknown), "dim",
   "created_at", "exported_at"}``
2. ``{"type": "subject", "subject_id", "metadata", "created_at"}`` for every subject, by id
3. ``{"type": "face", "face_id", "subject_id", "embedding" (base64 of the little-endian
   float32 vector, exact), "quality" (the enrolment quality figures), "created_at",
   "content_sha256" (or null), "image" (base64 of the stored photo, or null)}`` by face id
4. people discovery (:mod:`service.gallery.people_sql`), each by id: ``{"type": "photo",
   "photo_id", "width", "height", "created_at"}``, ``{"type": "cluster", "cluster",
   "subject_id", "origin"}``, ``{"type": "photo_face", "face_id", "photo_id", "embedding",
   "box", "landmarks", "quality", "clusterable", "thumbnail" (base64 or null), "cluster",
   "subject_id", "assignment", "enrolled_face_id" (the face line of its subject, or null),
   "created_at"}``, ``{"type": "cannot_link", "face_id", "cluster", "subject_id"}``
5. ``{"type": "end", "subjects": n, "faces": m, "people": {kind: count}, "sha256": ...}``:
   the counts and the sha256 of every preceding line's bytes (newlines included), so that
   a truncated or altered file is refused.

Times are epoch seconds.  An export is read in one consistent snapshot of the store.

:func:`read_export` validates a whole file (structure, counts, checksum, line length, and
every record by the same rules as a REST write: :func:`service.gallery.bulk.check_subject`
and :func:`~service.gallery.bulk.check_face`; face ids and photos' ``content_sha256``
unique) before anything is written; :func:`restore` then refuses a
file of another model than the served one (``model_mismatch``) and writes the gallery,
its subjects and faces in one transaction (:func:`service.gallery.bulk.write_many`),
one change-log entry per face, and its people records (photos, clusters, photo faces,
cannot-link rules) in that same transaction
(:meth:`~service.gallery.store.PeopleStore.restore_gallery`) with a ``people`` entry.
Restored faces get new face ids; the gallery name may be changed, and must not exist yet.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, BinaryIO

import numpy as np

from service.config import Settings
from service.gallery.bulk import (
    check_face,
    check_sha256,
    check_subject,
    check_time,
    checked_faces,
    write_many,
)
from service.gallery.errors import ExportModelMismatch, InvalidExport, InvalidInput
from service.gallery.names import check_gallery, check_subject_id
from service.gallery.service import GalleryService, check_name, check_vectors
from service.gallery.store import GalleryStore, NewFace, NewSubject, PeopleStore

FORMAT = "facegate-gallery"
VERSION = 1
#: people discovery's records, in the order they are written
PEOPLE_KINDS = ("photo", "cluster", "photo_face", "cannot_link")
MEDIA_TYPE = "application/gzip"
#: Bytes a line may hold beyond its photo's base64 (embedding, quality, ids, times).
LINE_SLACK = 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES: int = Settings.model_fields["max_image_bytes"].default


# --- writing ---------------------------------------------------------------------------
def export_lines(
    store: GalleryStore, gallery: str, model_sha256: Callable[[str], str | None] | None = None
) -> Iterator[bytes]:
    """The uncompressed lines of ``gallery``'s export (consume in one thread);
    ``model_sha256(model_id)`` gives the header's model file sha256 (None: unknown)."""
    digest = hashlib.sha256()
    counts = {"subject": 0, "face": 0, **dict.fromkeys(PEOPLE_KINDS, 0)}

    def line(record: dict) -> bytes:
        data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        digest.update(data)
        return data

    for kind, row in store.export_gallery(gallery):
        if kind == "gallery":
            yield line(
                {
                    "type": "header",
                    "format": FORMAT,
                    "version": VERSION,
                    "gallery": row["name"],
                    "model_id": row["model_id"],
                    "model_sha256": model_sha256 and model_sha256(row["model_id"]),
                    "dim": row["dim"],
                    "created_at": row["created_at"],
                    "exported_at": time.time(),
                }
            )
            continue
        counts[kind] += 1
        if kind == "subject":
            yield line({"type": "subject", **row})
        elif kind in PEOPLE_KINDS:
            yield line({"type": kind, **_people_out(row)})
        else:
            image = row["image"]
            yield line(
                {
                    "type": "face",
                    "face_id": row["face_id"],
                    "subject_id": row["subject_id"],
                    "embedding": base64.b64encode(row["embedding"]).decode(),
                    "quality": row["quality"],
                    "created_at": row["created_at"],
                    "content_sha256": row["content_sha256"],
                    "image": None if image is None else base64.b64encode(image).decode(),
                }
            )
    end = {
        "type": "end",
        "subjects": counts["subject"],
        "faces": counts["face"],
        "people": {kind: counts[kind] for kind in PEOPLE_KINDS},
        "sha256": digest.hexdigest(),
    }
    yield json.dumps(end, separators=(",", ":")).encode() + b"\n"


def write_export(
    store: GalleryStore,
    gallery: str,
    out: IO[bytes],
    model_sha256: Callable[[str], str | None] | None = None,
) -> dict:
    """Write ``gallery``'s export, gzip-compressed, to ``out``; return the end record."""
    last = b""
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        for data in export_lines(store, gallery, model_sha256):
            gz.write(data)
            last = data
    return json.loads(last)


# --- reading ---------------------------------------------------------------------------
@dataclass
class Export:
    """A validated export file."""

    gallery: str
    model_id: str
    model_sha256: str | None
    dim: int | None
    subjects: list[NewSubject] = field(default_factory=list)
    faces: list[NewFace] = field(default_factory=list)
    face_ids: list[int] = field(default_factory=list)  # as exported, per face
    people: dict[str, list[dict]] = field(
        default_factory=lambda: {kind: [] for kind in PEOPLE_KINDS}
    )


def _refuse(number: int, message: str) -> InvalidExport:
    return InvalidExport(f"not a valid gallery export (line {number}): {message}")


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not valid base64") from None


def _object(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _header(record: dict) -> Export:
    if record.get("type") != "header" or record.get("format") != FORMAT:
        raise InvalidInput(f"the first line is not a {FORMAT} header")
    if record.get("version") != VERSION:
        raise InvalidInput(
            f"format version {record.get('version')!r} is not supported "
            f"(this version reads {VERSION})"
        )
    dim = record.get("dim")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise InvalidInput("dim must be a positive integer or null")
    sha = record.get("model_sha256")
    for what in ("created_at", "exported_at"):
        if record.get(what) is not None:
            check_time(record[what], what)
    return Export(
        check_gallery(record.get("gallery")),
        check_name(record.get("model_id"), "model_id"),
        None if sha is None else check_sha256(sha, "model_sha256"),
        dim,
    )


def _subject(record: dict) -> NewSubject:
    return check_subject(
        NewSubject(
            check_subject_id(record.get("subject_id")),
            _object(record.get("metadata"), "metadata"),
            check_time(record.get("created_at")),
        )
    )


def _face(record: dict, export: Export, seen: _Seen, max_image_bytes: int) -> NewFace:
    subject_id = check_subject_id(record.get("subject_id"))
    if subject_id not in seen.subjects:
        raise InvalidInput(f"face of subject {subject_id!r}, which the file does not list")
    face_id = record.get("face_id")
    if isinstance(face_id, bool) or not isinstance(face_id, int) or face_id < 1:
        raise InvalidInput("face_id must be a positive integer")
    if face_id in seen.face_ids:
        raise InvalidInput(f"face {face_id} appears twice")
    raw = _b64(record.get("embedding"), "embedding")
    if export.dim is None or len(raw) != 4 * export.dim:
        raise InvalidInput(f"embedding has {len(raw)} bytes, not {export.dim} float32 values")
    image = record.get("image")
    digest = record.get("content_sha256")
    if digest is not None and check_sha256(digest) in seen.photos:
        raise InvalidInput(f"face {face_id} has the photo (content_sha256) of another face")
    face = check_face(
        NewFace(
            subject_id,
            np.frombuffer(raw, dtype="<f4"),
            _object(record.get("quality"), "quality"),
            None if image is None else _b64(image, "image"),
            digest,
            check_time(record.get("created_at")),
        ),
        max_image_bytes,
        export.dim,
    )
    seen.face_ids.add(face_id)
    if digest is not None:
        seen.photos.add(digest)
    return face


@dataclass
class _Seen:
    """What the lines read so far named: subjects, face ids, photos."""

    subjects: set[str] = field(default_factory=set)
    face_ids: set[int] = field(default_factory=set)
    photos: set[str] = field(default_factory=set)


def _lines(gz: gzip.GzipFile, limit: int) -> Iterator[bytes]:
    """The lines of ``gz``, refusing one longer than ``limit`` bytes before holding more."""
    number = 0
    while data := gz.readline(limit + 1):
        number += 1
        if len(data) > limit:
            raise _refuse(number, f"the line is longer than {limit} bytes")
        yield data


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{what} must be a positive integer")
    return value


def _people_out(row: dict) -> dict:
    """A people record as an export line (bytes as base64)."""
    out = dict(row)
    for key in ("embedding", "thumbnail"):
        if key in out:
            out[key] = None if out[key] is None else base64.b64encode(out[key]).decode()
    return out


def _people_in(kind: str, record: dict, export: Export) -> dict:
    """A checked people record: references to photos, clusters, subjects and faces must
    point at records earlier in the file."""
    people = export.people
    if kind == "photo":
        check_sha256(record.get("photo_id"), "photo_id")
        return {
            "photo_id": record["photo_id"],
            "width": _int(record.get("width"), "width"),
            "height": _int(record.get("height"), "height"),
            "created_at": check_time(record.get("created_at"), "created_at"),
        }
    subjects = {s.subject_id for s in export.subjects}
    subject_id = record.get("subject_id")
    if subject_id is not None and check_subject_id(subject_id) not in subjects:
        raise InvalidInput(f"{kind} of subject {subject_id!r}, which the file does not list")
    clusters = {c["cluster"] for c in people["cluster"]}
    cluster = record.get("cluster")
    if kind == "cluster":
        if record.get("origin") not in ("automatic", "manual"):
            raise InvalidInput("cluster origin must be automatic or manual")
        return {
            "cluster": _int(cluster, "cluster"),
            "subject_id": subject_id,
            "origin": record["origin"],
        }
    if cluster is not None and _int(cluster, "cluster") not in clusters:
        raise InvalidInput(f"{kind} of cluster {cluster}, which the file does not list")
    if kind == "cannot_link":
        known = {f["face_id"] for f in people["photo_face"]}
        if record.get("face_id") not in known:
            raise InvalidInput("cannot_link of a face the file does not list")
        return {"face_id": record["face_id"], "cluster": cluster, "subject_id": subject_id}
    if record.get("photo_id") not in {p["photo_id"] for p in people["photo"]}:
        raise InvalidInput("photo_face of a photo the file does not list")
    raw = _b64(record.get("embedding"), "embedding")
    if export.dim is None or len(raw) != 4 * export.dim:
        raise InvalidInput(f"embedding has {len(raw)} bytes, not {export.dim} float32 values")
    vector = check_vectors(np.frombuffer(raw, dtype="<f4"), export.dim, batch=False)
    enrolled = record.get("enrolled_face_id")
    if enrolled is not None and _int(enrolled, "enrolled_face_id") not in export.face_ids:
        raise InvalidInput("photo_face enrolled as a face the file does not list")
    if record.get("assignment") not in (None, "automatic", "manual"):
        raise InvalidInput("assignment must be automatic, manual or null")
    thumbnail = record.get("thumbnail")
    for key in ("box", "landmarks"):
        if not isinstance(record.get(key), list):
            raise InvalidInput(f"{key} must be a list")
    return {
        "face_id": _int(record.get("face_id"), "face_id"),
        "photo_id": record["photo_id"],
        "embedding": vector.astype("<f4").tobytes(),
        "box": record["box"],
        "landmarks": record["landmarks"],
        "quality": _object(record.get("quality"), "quality"),
        "clusterable": bool(record.get("clusterable")),
        "thumbnail": None if thumbnail is None else _b64(thumbnail, "thumbnail"),
        "cluster": cluster,
        "subject_id": subject_id,
        "assignment": record.get("assignment"),
        "enrolled_face_id": enrolled,
        "created_at": check_time(record.get("created_at"), "created_at"),
    }


def read_export(source: BinaryIO, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Export:
    """Parse and check a whole export file (gzip, JSON lines); ``InvalidExport`` names the
    first problem: not gzip, truncated, altered (checksum), a line longer than a photo of
    ``max_image_bytes`` needs, a malformed record or one the REST API would refuse."""
    digest = hashlib.sha256()
    export: Export | None = None
    seen = _Seen()
    subjects = seen.subjects
    end: dict | None = None
    number = 0
    limit = 4 * (max_image_bytes // 3 + 1) + LINE_SLACK  # a base64 photo and the rest
    try:
        with gzip.GzipFile(fileobj=source, mode="rb") as gz:
            for number, data in enumerate(_lines(gz, limit), start=1):
                if end is not None:
                    raise _refuse(number, "data after the end record")
                try:
                    record = json.loads(data)
                except (ValueError, RecursionError, UnicodeDecodeError):
                    # ValueError: JSONDecodeError, or an integer of too many digits;
                    # RecursionError: nested deeper than the parser goes
                    raise _refuse(number, "not a JSON object") from None
                if not isinstance(record, dict) or not data.endswith(b"\n"):
                    raise _refuse(number, "not a complete JSON object line")
                kind = record.get("type")
                try:
                    if export is None:
                        export = _header(record)
                    elif kind == "subject":
                        subject = _subject(record)
                        if subject.subject_id in subjects:
                            raise InvalidInput(f"subject {subject.subject_id!r} appears twice")
                        subjects.add(subject.subject_id)
                        export.subjects.append(subject)
                    elif kind == "face":
                        export.faces.append(_face(record, export, seen, max_image_bytes))
                        export.face_ids.append(_int(record.get("face_id"), "face_id"))
                    elif kind in PEOPLE_KINDS:
                        export.people[kind].append(_people_in(kind, record, export))
                    elif kind == "end":
                        end = record
                        continue
                    else:
                        raise InvalidInput(f"unknown record type {kind!r}")
                except InvalidInput as exc:
                    raise _refuse(number, exc.message) from None
                digest.update(data)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise InvalidExport(
            f"not a valid gallery export: the gzip stream is damaged or truncated ({exc})"
        ) from None
    if export is None:
        raise InvalidExport("not a valid gallery export: the file is empty")
    if end is None:
        raise InvalidExport(
            f"not a valid gallery export: no end record after line {number}; the file is truncated"
        )
    if (end.get("subjects"), end.get("faces")) != (len(export.subjects), len(export.faces)):
        raise InvalidExport(
            f"not a valid gallery export: the end record counts {end.get('subjects')} subjects "
            f"and {end.get('faces')} faces, the file holds {len(export.subjects)} and "
            f"{len(export.faces)}"
        )
    held = {kind: len(records) for kind, records in export.people.items()}
    if end.get("people", dict.fromkeys(PEOPLE_KINDS, 0)) != held:
        raise InvalidExport(
            f"not a valid gallery export: the end record counts {end.get('people')} people "
            f"records, the file holds {held}"
        )
    if end.get("sha256") != digest.hexdigest():
        raise InvalidExport(
            "not a valid gallery export: the content does not match its "
            "sha256 in the end record; the file was altered"
        )
    return export


# --- restoring -------------------------------------------------------------------------
def restore(
    gallery: GalleryService,
    export: Export,
    model_id: str,
    model_sha256: str | None,
    target: str | None = None,
) -> dict:
    """Write a validated export into gallery ``target`` (default: the exported name), which
    must not exist; refuse another model's file.  Returns a summary."""
    name = check_gallery(target or export.gallery)
    if export.model_id != model_id or (
        export.model_sha256 is not None
        and model_sha256 is not None
        and export.model_sha256 != model_sha256
    ):
        raise ExportModelMismatch(export.gallery, export.model_id, model_id)
    if any(export.people.values()):
        store = gallery.store
        if not isinstance(store, PeopleStore):
            raise InvalidExport(f"the {store.backend} store cannot hold photos and clusters")
        faces = checked_faces(gallery, name, model_id, export.subjects, export.faces)
        # all of the file or none of it: one transaction
        results, seq = store.restore_gallery(
            name, model_id, export.subjects, faces, export.face_ids, export.people
        )
        gallery.sync_to(seq)
    else:
        results = write_many(
            gallery, name, model_id, export.subjects, export.faces, new_gallery=True
        )
    photos = sum(face.image is not None for face in export.faces)
    return {
        "gallery": name,
        "source_gallery": export.gallery,
        "model": model_id,
        "subjects": len(export.subjects),
        "faces": len(results),
        "photos": photos if gallery.settings.store_images else 0,
        "photos_dropped": 0 if gallery.settings.store_images else photos,
        "people": {kind: len(records) for kind, records in export.people.items()},
    }
