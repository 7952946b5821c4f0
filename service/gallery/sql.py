"""The store's SQL, written once for both backends.

Backends supply connections and transactions (:meth:`SQLStore._write`,
:meth:`SQLStore._read`, :meth:`SQLStore._ddl`); statements here use ``?``
placeholders, which the PostgreSQL backend rewrites to ``%s``.  Every write
runs inside ``_write``, which serialises writers on the ``log_head`` row (see
:mod:`service.gallery.store`), and every write that changes an index appends
its change-log entry through :meth:`SQLStore._log` in the same transaction.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import numpy as np

from service.gallery.audit import current as current_audit
from service.gallery.errors import (
    Conflict,
    FaceNotFound,
    GalleryModelMismatch,
    GalleryNotFound,
    InvalidEmbedding,
    PhotoEnrolledElsewhere,
    SubjectNotFound,
)
from service.gallery.people_sql import PeopleSQL
from service.gallery.schema import LATEST, MIGRATIONS
from service.gallery.sql_audit import AuditSQL
from service.gallery.sql_changes import ChangeLogSQL
from service.gallery.sql_dialect import Cursor, Row
from service.gallery.sql_export import EXPORT_CHUNK, ExportSQL
from service.gallery.sql_json import MAX_JSON_BYTES, MAX_JSON_DEPTH, dump_json, json_depth
from service.gallery.store import GalleryFaces, GalleryStore, NewFace, NewSubject
from service.records import FaceRecord, GalleryRecord, SubjectRecord, iso

__all__ = [
    "EXPORT_CHUNK",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "Cursor",
    "Row",
    "SQLStore",
    "dump_json",
    "iso",
    "json_depth",
]


class SQLStore(ChangeLogSQL, AuditSQL, ExportSQL, PeopleSQL, GalleryStore):
    """The shared implementation of :class:`GalleryStore` over a SQL connection: CRUD of
    galleries, subjects and faces here; the change log (:mod:`~service.gallery.sql_changes`),
    the audit log (:mod:`~service.gallery.sql_audit`), export reads
    (:mod:`~service.gallery.sql_export`), JSON limits (:mod:`~service.gallery.sql_json`) and
    the placeholder shim (:mod:`~service.gallery.sql_dialect`) in modules of their own."""

    dialect: str = ""

    # --- backend hooks ----------------------------------------------------------
    @abc.abstractmethod
    def _write_tx(self) -> AbstractContextManager[Cursor]:
        """A write transaction holding the writer lock; commits on clean exit."""

    @abc.abstractmethod
    def _read(self) -> AbstractContextManager[Cursor]:
        """A read transaction that sees one consistent snapshot."""

    @abc.abstractmethod
    def _ddl(self) -> AbstractContextManager[Cursor]:
        """A transaction for migrations, exclusive against other migrators."""

    def _notify(self, cur: Cursor, seq: int) -> None:
        """Announce ``seq`` to other replicas when the transaction commits."""

    @contextmanager
    def _write(self) -> Iterator[Cursor]:
        """:meth:`_write_tx`, plus the audit row of the current request (see
        :mod:`service.gallery.audit`) when the transaction appended change-log entries."""
        entry = current_audit()
        with self._write_tx() as cur:
            cur.changes = []
            yield cur
            if entry is not None and cur.changes:
                entry.add([s for _, s in cur.changes], [f for f, _ in cur.changes])
                self._insert_audit(cur, [entry], [(f, s) for f, s in cur.changes])
                entry.written = True

    # --- schema -----------------------------------------------------------------
    def migrate(self) -> int:
        steps = MIGRATIONS[self.dialect]
        with self._ddl() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = cur.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                cur.execute("INSERT INTO schema_version (version) VALUES (0)")
                current = 0
            else:
                current = int(row[0])
            if current > LATEST:
                raise RuntimeError(
                    f"store schema version {current} is newer than this code's {LATEST}"
                )
            for version in range(current + 1, LATEST + 1):
                for statement in steps[version]:
                    cur.execute(statement)
                cur.execute("UPDATE schema_version SET version = ?", (version,))
        return LATEST

    def schema_version(self) -> int:
        with self._ddl() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = cur.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    # --- helpers ----------------------------------------------------------------
    @staticmethod
    def _gallery_row(cur: Cursor, name: str) -> Row | None:
        return cur.execute(
            "SELECT name, model_id, dim, created_at FROM galleries WHERE name = ?", (name,)
        ).named()

    def _require_gallery(self, cur: Cursor, name: str) -> Row:
        row = self._gallery_row(cur, name)
        if row is None:
            raise GalleryNotFound(f"gallery {name!r} does not exist")
        return row

    def _gallery_for_model(
        self, cur: Cursor, name: str, model_id: str, size: int | None = None
    ) -> Row:
        """The one check of a write: gallery ``name`` exists (``GalleryNotFound``), holds
        ``model_id``'s embeddings (``GalleryModelMismatch``) and, with ``size``, vectors of
        that dimension (``InvalidEmbedding``); a gallery without a dimension yet takes
        ``size``."""
        row = self._require_gallery(cur, name)
        if row["model_id"] != model_id:
            raise GalleryModelMismatch(name, row["model_id"], model_id)
        if size is not None:
            if row["dim"] is None:
                cur.execute("UPDATE galleries SET dim = ? WHERE name = ?", (size, name))
            elif row["dim"] != size:
                raise InvalidEmbedding(
                    f"gallery {name!r} holds {row['dim']}-d embeddings, got {size}-d"
                )
        return row

    @staticmethod
    def _gallery_record(cur: Cursor, row: Row) -> GalleryRecord:
        subjects, faces = cur.execute(
            "SELECT (SELECT COUNT(*) FROM subjects WHERE gallery = ?), "
            "(SELECT COUNT(*) FROM faces WHERE gallery = ?)",
            (row["name"], row["name"]),
        ).fetchone()
        return GalleryRecord.from_row(row, subjects, faces)

    @staticmethod
    def _faces_of(cur: Cursor, gallery: str, subject_ids: list[str]) -> dict[str, list[FaceRecord]]:
        faces: dict[str, list[FaceRecord]] = {sid: [] for sid in subject_ids}
        if not subject_ids:
            return faces
        marks = ", ".join("?" * len(subject_ids))
        rows = cur.execute(
            f"SELECT subject_id, face_id, created_at, quality, source_face_id FROM faces "
            f"WHERE gallery = ? AND subject_id IN ({marks}) ORDER BY face_id",
            (gallery, *subject_ids),
        ).all_named()
        for row in rows:
            source = row["source_face_id"]
            faces[row["subject_id"]].append(
                FaceRecord(
                    face_id=int(row["face_id"]),
                    created_at=iso(row["created_at"]),
                    quality=json.loads(row["quality"]),
                    reenrolled_from=None if source is None else int(source),
                )
            )
        return faces

    @staticmethod
    def _subject_record(row: Row, faces: list[FaceRecord]) -> SubjectRecord:
        return SubjectRecord.from_row(row, json.loads(row["metadata"]), faces)

    def _require_subject(self, cur: Cursor, gallery: str, subject_id: str) -> Row:
        self._require_gallery(cur, gallery)
        row = cur.execute(
            "SELECT subject_id, metadata, created_at, updated_at FROM subjects "
            "WHERE gallery = ? AND subject_id = ?",
            (gallery, subject_id),
        ).named()
        if row is None:
            raise SubjectNotFound(f"subject {subject_id!r} does not exist in gallery {gallery!r}")
        return row

    def _load_subject(self, cur: Cursor, gallery: str, subject_id: str) -> SubjectRecord:
        row = self._require_subject(cur, gallery, subject_id)
        return self._subject_record(row, self._faces_of(cur, gallery, [subject_id])[subject_id])

    # --- galleries --------------------------------------------------------------
    def create_gallery(
        self, name: str, model_id: str, dim: int | None = None
    ) -> tuple[GalleryRecord, bool]:
        with self._write() as cur:
            created = self._gallery_row(cur, name) is None
            if created:
                cur.execute(
                    "INSERT INTO galleries (name, model_id, dim, created_at) VALUES (?, ?, ?, ?)",
                    (name, model_id, dim, time.time()),
                )
            row = self._gallery_for_model(cur, name, model_id)
            return self._gallery_record(cur, row), created

    def get_gallery(self, name: str) -> GalleryRecord:
        with self._read() as cur:
            return self._gallery_record(cur, self._require_gallery(cur, name))

    def list_galleries(self) -> list[GalleryRecord]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT name, model_id, dim, created_at FROM galleries ORDER BY name"
            ).all_named()
            return [self._gallery_record(cur, row) for row in rows]

    def delete_gallery(self, name: str) -> int:
        with self._write() as cur:
            self._require_gallery(cur, name)
            cur.execute("DELETE FROM faces WHERE gallery = ?", (name,))
            cur.execute("DELETE FROM subjects WHERE gallery = ?", (name,))
            cur.execute("DELETE FROM galleries WHERE name = ?", (name,))
            return self._log(cur, name, "delete_gallery", None, None)

    # --- subjects ---------------------------------------------------------------
    def upsert_subject(
        self,
        gallery: str,
        subject_id: str,
        metadata: dict | None,
        model_id: str,
        dim: int | None = None,
    ) -> tuple[SubjectRecord, bool]:
        text = None if metadata is None else dump_json(metadata, "metadata")
        with self._write() as cur:
            now = time.time()
            if self._gallery_row(cur, gallery) is None:
                cur.execute(
                    "INSERT INTO galleries (name, model_id, dim, created_at) VALUES (?, ?, ?, ?)",
                    (gallery, model_id, dim, now),
                )
            else:
                self._gallery_for_model(cur, gallery, model_id)
            exists = cur.execute(
                "SELECT 1 FROM subjects WHERE gallery = ? AND subject_id = ?", (gallery, subject_id)
            ).fetchone()
            if exists is None:
                cur.execute(
                    "INSERT INTO subjects (gallery, subject_id, metadata, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (gallery, subject_id, text or "{}", now, now),
                )
            return self._load_subject(cur, gallery, subject_id), exists is None

    def get_subject(self, gallery: str, subject_id: str) -> SubjectRecord:
        with self._read() as cur:
            return self._load_subject(cur, gallery, subject_id)

    def update_subject(self, gallery: str, subject_id: str, metadata: dict) -> SubjectRecord:
        dump_json(metadata, "metadata")
        with self._write() as cur:
            row = self._require_subject(cur, gallery, subject_id)
            merged = json.loads(row["metadata"])
            for key, value in metadata.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            cur.execute(
                "UPDATE subjects SET metadata = ?, updated_at = ? "
                "WHERE gallery = ? AND subject_id = ?",
                (dump_json(merged, "metadata"), time.time(), gallery, subject_id),
            )
            return self._load_subject(cur, gallery, subject_id)

    def delete_subject(self, gallery: str, subject_id: str) -> tuple[int, int]:
        with self._write() as cur:
            self._require_subject(cur, gallery, subject_id)
            removed = cur.execute(
                "DELETE FROM faces WHERE gallery = ? AND subject_id = ?", (gallery, subject_id)
            ).rowcount
            cur.execute(
                "DELETE FROM subjects WHERE gallery = ? AND subject_id = ?", (gallery, subject_id)
            )
            self._people_forget(cur, gallery, subject_id=subject_id)
            return int(removed), self._log(cur, gallery, "delete_subject", None, subject_id)

    def list_subjects(
        self, gallery: str, limit: int, after: str | None
    ) -> tuple[list[SubjectRecord], bool]:
        with self._read() as cur:
            self._require_gallery(cur, gallery)
            sql = (
                "SELECT subject_id, metadata, created_at, updated_at FROM subjects "
                "WHERE gallery = ?"
            )
            params: list = [gallery]
            if after is not None:
                sql += " AND subject_id > ?"
                params.append(after)
            sql += " ORDER BY subject_id LIMIT ?"
            params.append(limit + 1)
            rows = cur.execute(sql, params).all_named()
            more = len(rows) > limit
            rows = rows[:limit]
            faces = self._faces_of(cur, gallery, [row["subject_id"] for row in rows])
            return [self._subject_record(row, faces[row["subject_id"]]) for row in rows], more

    # --- faces ------------------------------------------------------------------
    def add_face(
        self,
        gallery: str,
        subject_id: str,
        embedding: np.ndarray,
        model_id: str,
        quality: dict,
        image: bytes | None,
        source_face_id: int | None = None,
    ) -> tuple[FaceRecord, int]:
        quality_text = dump_json(quality or {}, "quality")
        vector = np.ascontiguousarray(embedding, dtype="<f4")
        source = None if source_face_id is None else int(source_face_id)
        with self._write() as cur:
            self._gallery_for_model(cur, gallery, model_id, vector.size)
            self._require_subject(cur, gallery, subject_id)
            if source is not None:
                # Writers are serialised, so this check cannot race another re-enrolment.
                done = cur.execute(
                    "SELECT face_id FROM faces WHERE gallery = ? AND source_face_id = ?",
                    (gallery, source),
                ).fetchone()
                if done is not None:
                    raise Conflict(
                        f"face {source} is already re-enrolled in gallery "
                        f"{gallery!r} as face {int(done[0])}"
                    )
            now = time.time()
            face_id = int(
                cur.execute(
                    "INSERT INTO faces (gallery, subject_id, embedding, model_id, quality, image, "
                    "created_at, source_face_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING face_id",
                    (
                        gallery,
                        subject_id,
                        vector.tobytes(),
                        model_id,
                        quality_text,
                        image,
                        now,
                        source,
                    ),
                ).fetchone()[0]
            )
            seq = self._log(cur, gallery, "add", face_id, subject_id)
        face = FaceRecord(
            face_id=face_id,
            created_at=iso(now),
            quality=json.loads(quality_text),
            subject_id=subject_id,
            reenrolled_from=source,
        )
        return face, seq

    def delete_face(self, gallery: str, face_id: int) -> tuple[str, int]:
        with self._write() as cur:
            self._require_gallery(cur, gallery)
            row = cur.execute(
                "SELECT subject_id FROM faces WHERE face_id = ? AND gallery = ?",
                (int(face_id), gallery),
            ).fetchone()
            if row is None:
                raise FaceNotFound(f"face {face_id} does not exist in gallery {gallery!r}")
            cur.execute("DELETE FROM faces WHERE face_id = ?", (int(face_id),))
            self._people_forget(cur, gallery, face_id=int(face_id))
            return row[0], self._log(cur, gallery, "delete_face", int(face_id), row[0])

    def get_face_image(self, gallery: str, face_id: int) -> bytes | None:
        with self._read() as cur:
            self._require_gallery(cur, gallery)
            row = cur.execute(
                "SELECT image FROM faces WHERE face_id = ? AND gallery = ?", (int(face_id), gallery)
            ).fetchone()
        if row is None:
            raise FaceNotFound(f"face {face_id} does not exist in gallery {gallery!r}")
        return None if row[0] is None else bytes(row[0])

    # --- many faces at once ---------------------------------------------------------
    def write_faces(
        self,
        gallery: str,
        model_id: str,
        subjects: list[NewSubject],
        faces: list[NewFace],
        *,
        new_gallery: bool = False,
        only_with_faces: bool = False,
    ) -> tuple[list[dict], int | None]:
        insert = self._faces_writer(
            gallery, model_id, subjects, faces, new_gallery, only_with_faces
        )
        with self._write() as cur:
            return insert(cur)

    def _faces_writer(
        self,
        gallery: str,
        model_id: str,
        subjects: list[NewSubject],
        faces: list[NewFace],
        new_gallery: bool,
        only_with_faces: bool,
    ) -> Callable[[Cursor], tuple[list[dict], int | None]]:
        """:meth:`write_faces`, its input checked now, its writes to run in a transaction
        of the caller's (the returned function; the restore adds its people records to it)."""
        metadata = {s.subject_id: dump_json(s.metadata or {}, "metadata") for s in subjects}
        qualities = [dump_json(f.quality or {}, "quality") for f in faces]
        vectors = [np.ascontiguousarray(f.embedding, dtype="<f4").reshape(-1) for f in faces]
        sizes = {v.size for v in vectors}
        if len(sizes) > 1:
            raise InvalidEmbedding(f"embeddings of one write differ in size: {sorted(sizes)}")

        def insert(cur: Cursor) -> tuple[list[dict], int | None]:
            results: list[dict] = []
            seq = None
            now = time.time()
            if self._gallery_row(cur, gallery) is None:
                cur.execute(
                    "INSERT INTO galleries (name, model_id, dim, created_at) "
                    "VALUES (?, ?, NULL, ?)",
                    (gallery, model_id, now),
                )
            elif new_gallery:
                raise Conflict(f"gallery {gallery!r} already exists; restore into a new gallery")
            self._gallery_for_model(cur, gallery, model_id, sizes.pop() if sizes else None)
            pending = {subject.subject_id: subject for subject in subjects}
            known: set[str] = set()

            def ensure(subject_id: str) -> None:
                """Insert ``subject_id`` of ``subjects`` (unless present) before its first use."""
                known.add(subject_id)
                subject = pending.pop(subject_id, None)
                if subject is None:
                    self._require_subject(cur, gallery, subject_id)
                    return
                created = now if subject.created_at is None else float(subject.created_at)
                if (
                    cur.execute(
                        "SELECT 1 FROM subjects WHERE gallery = ? AND subject_id = ?",
                        (gallery, subject_id),
                    ).fetchone()
                    is None
                ):
                    cur.execute(
                        "INSERT INTO subjects (gallery, subject_id, metadata, created_at, "
                        "updated_at) VALUES (?, ?, ?, ?, ?)",
                        (gallery, subject_id, metadata[subject_id], created, created),
                    )

            for face, vector, quality in zip(faces, vectors, qualities, strict=True):
                if face.content_sha256 is not None:
                    done = cur.execute(
                        "SELECT face_id, subject_id FROM faces "
                        "WHERE gallery = ? AND content_sha256 = ? ORDER BY face_id LIMIT 1",
                        (gallery, face.content_sha256),
                    ).fetchone()
                    if done is not None and done[1] != face.subject_id:
                        # enrolled under another subject: refused, naming neither it nor its face
                        results.append(
                            {
                                "face_id": None,
                                "subject_id": face.subject_id,
                                "created": False,
                                "error": PhotoEnrolledElsewhere.code,
                            }
                        )
                        continue
                    if done is not None:
                        results.append(
                            {"face_id": int(done[0]), "subject_id": done[1], "created": False}
                        )
                        continue
                if face.subject_id not in known:
                    ensure(face.subject_id)
                created = now if face.created_at is None else float(face.created_at)
                face_id = int(
                    cur.execute(
                        "INSERT INTO faces (gallery, subject_id, embedding, model_id, quality, "
                        "image, created_at, content_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                        "RETURNING face_id",
                        (
                            gallery,
                            face.subject_id,
                            vector.tobytes(),
                            model_id,
                            quality,
                            face.image,
                            created,
                            face.content_sha256,
                        ),
                    ).fetchone()[0]
                )
                seq = self._log(cur, gallery, "add", face_id, face.subject_id)
                results.append({"face_id": face_id, "subject_id": face.subject_id, "created": True})
            if not only_with_faces:
                for subject_id in list(pending):
                    ensure(subject_id)
            return results, seq

        return insert

    def content_hashes(self, gallery: str) -> set[str]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT content_sha256 FROM faces WHERE gallery = ? AND content_sha256 IS NOT NULL",
                (gallery,),
            ).fetchall()
        return {r[0] for r in rows}

    @staticmethod
    def _faces_with_embeddings(
        name: str, model_id: str, dim: int | None, rows: list
    ) -> GalleryFaces:
        """``(face_id, subject_id, embedding)`` rows as one :class:`GalleryFaces`."""
        face_ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        blob = b"".join(bytes(r[2]) for r in rows)
        vectors = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        return GalleryFaces(
            name=name,
            model_id=model_id,
            dim=dim,
            face_ids=face_ids,
            subject_ids=[r[1] for r in rows],
            embeddings=vectors.reshape(len(rows), int(dim or 0)),
        )

    def load_all(self) -> tuple[int, list[GalleryFaces]]:
        with self._read() as cur:
            head = int(cur.execute("SELECT seq FROM log_head WHERE id = 1").fetchone()[0])
            galleries = cur.execute(
                "SELECT name, model_id, dim FROM galleries ORDER BY name"
            ).fetchall()
            result = []
            for name, model_id, dim in galleries:
                rows = cur.execute(
                    "SELECT face_id, subject_id, embedding FROM faces WHERE gallery = ? "
                    "ORDER BY face_id",
                    (name,),
                ).fetchall()
                result.append(self._faces_with_embeddings(name, model_id, dim, rows))
        return head, result

    def subject_faces(self, gallery: str, subject_id: str) -> GalleryFaces:
        with self._read() as cur:
            row = self._require_gallery(cur, gallery)
            self._require_subject(cur, gallery, subject_id)
            rows = cur.execute(
                "SELECT face_id, subject_id, embedding FROM faces "
                "WHERE gallery = ? AND subject_id = ? ORDER BY face_id",
                (gallery, subject_id),
            ).fetchall()
        return self._faces_with_embeddings(row["name"], row["model_id"], row["dim"], rows)

    def face_ids(self, gallery: str) -> np.ndarray:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT face_id FROM faces WHERE gallery = ? ORDER BY face_id", (gallery,)
            ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def index_contents(self) -> tuple[int, dict[str, tuple[np.ndarray, list[str]]]]:
        with self._read() as cur:
            head = int(cur.execute("SELECT seq FROM log_head WHERE id = 1").fetchone()[0])
            names = [r[0] for r in cur.execute("SELECT name FROM galleries").fetchall()]
            rows = cur.execute(
                "SELECT gallery, face_id, subject_id FROM faces ORDER BY gallery, face_id"
            ).fetchall()
        grouped: dict[str, tuple[list[int], list[str]]] = {name: ([], []) for name in names}
        for gallery, face_id, subject_id in rows:
            ids, subjects = grouped[gallery]
            ids.append(int(face_id))
            subjects.append(subject_id)
        return head, {
            name: (np.array(ids, dtype=np.int64), subjects)
            for name, (ids, subjects) in grouped.items()
        }

    def stats(self) -> list[dict]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT g.name, g.model_id, g.dim, "
                "(SELECT COUNT(*) FROM subjects s WHERE s.gallery = g.name), "
                "(SELECT COUNT(*) FROM faces f WHERE f.gallery = g.name) "
                "FROM galleries g ORDER BY g.name"
            ).fetchall()
        return [
            {"name": n, "model_id": m, "dim": d, "subjects": int(s), "faces": int(f)}
            for n, m, d, s, f in rows
        ]
