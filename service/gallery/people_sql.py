"""People discovery's SQL (photos, photo faces, clusters, cannot-link rules), for both
backends: a mixin of :class:`~service.gallery.sql.SQLStore` implementing
:class:`~service.gallery.store.PeopleStore`.

Invariants every method keeps, inside its one write transaction:

* two faces of one photo are never in one cluster nor assigned to one subject;
* a face assigned to a subject has exactly one enrolled face of it (``enrolled_face_id``,
  added and deleted with their change-log entries, so every replica's index follows);
* the faces of a named cluster are its subject's; a face a person took out of a cluster
  or subject has a ``cannot_link`` row for it, and nothing automatic puts it back.

Every write ends with a ``people`` change-log entry of its gallery (after the ``add`` and
``delete_face`` entries of any enrolled faces it changed), in the same transaction, so
replicas and the log see pure cluster changes too; a write that changed no index still
leaves its audit row (with the photo faces and subjects it touched) in that transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from service.gallery.audit import current as current_audit
from service.gallery.errors import (
    ClusterNotFound,
    Conflict,
    FaceNotFound,
    InvalidEmbedding,
    InvalidInput,
    SubjectNotFound,
)
from service.gallery.store import (
    NewFace,
    NewPhoto,
    NewPhotoFace,
    NewSubject,
    PeopleFaces,
    PeopleStore,
)

if TYPE_CHECKING:
    from service.gallery.audit import AuditEntry
    from service.gallery.sql import Cursor

_FACE_COLUMNS = (
    "face_id, photo_id, box, landmarks, quality, clusterable, cluster_no, subject_id, "
    "assignment, enrolled_face_id"
)


def cluster_name(number: int | None) -> str | None:
    return None if number is None else f"c{int(number)}"


def cluster_number(cluster_id: object) -> int:
    """``c12`` -> 12; ``ClusterNotFound`` for anything that is not a cluster id."""
    if (
        isinstance(cluster_id, str)
        and cluster_id[:1] == "c"
        and cluster_id[1:].isdigit()
        and len(cluster_id) < 20
    ):
        return int(cluster_id[1:])
    raise ClusterNotFound(f"cluster {str(cluster_id)[:40]!r} does not exist")


def _face_dict(row) -> dict:
    return {
        "face_id": int(row[0]),
        "photo_id": row[1],
        "box": json.loads(row[2]),
        "landmarks": json.loads(row[3]),
        "quality": json.loads(row[4]),
        "clusterable": bool(row[5]),
        "cluster_id": cluster_name(row[6]),
        "subject_id": row[7],
        "assignment": row[8],
        "enrolled_face_id": None if row[9] is None else int(row[9]),
    }


class PeopleSQL(PeopleStore):
    """The people tables over :class:`SQLStore`'s transactions (mixed into it)."""

    if TYPE_CHECKING:  # provided by SQLStore

        def _write(self) -> AbstractContextManager[Cursor]: ...
        def _read(self) -> AbstractContextManager[Cursor]: ...
        def _log(
            self, cur: Cursor, gallery: str, op: str, face_id: int | None, subject_id: str | None
        ) -> int: ...
        def _append(
            self, cur: Cursor, gallery: str, op: str, face_id: int | None, subject_id: str | None
        ) -> int: ...
        def _faces_writer(
            self,
            gallery: str,
            model_id: str,
            subjects: list[NewSubject],
            faces: list[NewFace],
            new_gallery: bool,
            only_with_faces: bool,
        ) -> Callable[[Cursor], tuple[list[dict], int | None]]: ...
        def _require_gallery(self, cur: Cursor, name: str) -> Any: ...
        def _gallery_for_model(
            self, cur: Cursor, name: str, model_id: str, size: int | None = None
        ) -> Any: ...
        def _require_subject(self, cur: Cursor, gallery: str, subject_id: str) -> Any: ...
        @staticmethod
        def _insert_audit(
            cur: Cursor,
            entries: list[AuditEntry],
            changes: list[tuple[int | None, str | None]] | None = None,
        ) -> None: ...

    @contextmanager
    def _people_write(self) -> Iterator[Cursor]:
        entry = current_audit()
        with self._write() as cur:
            yield cur
            if entry is not None and not cur.changes and not entry.written:
                self._insert_audit(cur, [entry])
                entry.written = True

    @staticmethod
    def _audit_ids(faces=(), subjects=()) -> None:
        entry = current_audit()
        if entry is not None:
            entry.add(subjects, faces)

    # --- reads ------------------------------------------------------------------
    def _photo_dict(self, cur, gallery: str, photo_id: str) -> dict | None:
        row = cur.execute(
            "SELECT photo_id, width, height FROM photos WHERE gallery = ? AND photo_id = ?",
            (gallery, photo_id),
        ).fetchone()
        if row is None:
            return None
        faces = cur.execute(
            f"SELECT {_FACE_COLUMNS} FROM photo_faces WHERE gallery = ? AND photo_id = ? "
            "ORDER BY face_id",
            (gallery, photo_id),
        ).fetchall()
        return {
            "photo_id": row[0],
            "width": int(row[1]),
            "height": int(row[2]),
            "faces": [_face_dict(f) for f in faces],
        }

    def get_photo(self, gallery: str, photo_id: str) -> dict | None:
        with self._read() as cur:
            self._require_gallery(cur, gallery)
            return self._photo_dict(cur, gallery, photo_id)

    def _face_row(self, cur, gallery: str, face_id: int):
        row = cur.execute(
            f"SELECT {_FACE_COLUMNS} FROM photo_faces WHERE gallery = ? AND face_id = ?",
            (gallery, int(face_id)),
        ).fetchone()
        if row is None:
            raise FaceNotFound(f"face {face_id} is not a photo face of gallery {gallery!r}")
        return row

    def get_photo_face(self, gallery: str, face_id: int) -> dict:
        with self._read() as cur:
            self._require_gallery(cur, gallery)
            return _face_dict(self._face_row(cur, gallery, face_id))

    def face_thumbnail(self, gallery: str, face_id: int) -> bytes | None:
        with self._read() as cur:
            self._require_gallery(cur, gallery)
            self._face_row(cur, gallery, face_id)
            row = cur.execute(
                "SELECT thumbnail FROM photo_faces WHERE face_id = ?", (int(face_id),)
            ).fetchone()
        return None if row[0] is None else bytes(row[0])

    def _cluster_row(self, cur, gallery: str, cluster_no: int):
        row = cur.execute(
            "SELECT cluster_no, subject_id, origin FROM clusters "
            "WHERE gallery = ? AND cluster_no = ?",
            (gallery, int(cluster_no)),
        ).fetchone()
        if row is None:
            raise ClusterNotFound(
                f"cluster {cluster_name(cluster_no)!r} does not exist in gallery {gallery!r}"
            )
        return row

    def _cluster_dicts(self, cur, gallery: str, rows) -> list[dict]:
        numbers = [int(r[0]) for r in rows]
        members: dict[int, list[tuple[int, dict]]] = {n: [] for n in numbers}
        if numbers:
            marks = ", ".join("?" * len(numbers))
            for face_id, number, quality in cur.execute(
                f"SELECT face_id, cluster_no, quality FROM photo_faces WHERE gallery = ? "
                f"AND cluster_no IN ({marks}) ORDER BY face_id",
                (gallery, *numbers),
            ).fetchall():
                members[int(number)].append((int(face_id), json.loads(quality)))
        out = []
        for row in rows:
            faces = members[int(row[0])]
            best = max(
                faces,
                key=lambda f: f[1].get("det_score", 0.0) * f[1].get("face_size_px", 0.0),
                default=None,
            )
            out.append(
                {
                    "cluster_id": cluster_name(row[0]),
                    "face_ids": [f for f, _ in faces],
                    "size": len(faces),
                    "subject_id": row[1],
                    "origin": row[2],
                    "representative_face_id": None if best is None else best[0],
                }
            )
        return out

    def get_cluster(self, gallery: str, cluster_no: int) -> dict:
        with self._read() as cur:
            self._require_gallery(cur, gallery)
            return self._cluster_dicts(cur, gallery, [self._cluster_row(cur, gallery, cluster_no)])[
                0
            ]

    def list_clusters(
        self, gallery: str, limit: int, after: tuple[int, int] | None
    ) -> tuple[list[dict], bool]:
        sql = (
            "SELECT c.cluster_no, c.subject_id, c.origin, COUNT(f.face_id) AS n FROM clusters c "
            "JOIN photo_faces f ON f.cluster_no = c.cluster_no WHERE c.gallery = ? "
            "GROUP BY c.cluster_no, c.subject_id, c.origin"
        )
        params: list = [gallery]
        if after is not None:
            sql += " HAVING COUNT(f.face_id) < ? OR (COUNT(f.face_id) = ? AND c.cluster_no > ?)"
            params += [after[0], after[0], after[1]]
        sql += " ORDER BY n DESC, c.cluster_no LIMIT ?"
        params.append(int(limit) + 1)
        with self._read() as cur:
            self._require_gallery(cur, gallery)
            rows = cur.execute(sql, params).fetchall()
            more = len(rows) > limit
            return self._cluster_dicts(cur, gallery, rows[:limit]), more

    def people_faces(self, gallery: str) -> PeopleFaces:
        with self._read() as cur:
            gallery_row = self._require_gallery(cur, gallery)
            model_id, dim = gallery_row["model_id"], gallery_row["dim"]
            rows = cur.execute(
                "SELECT face_id, photo_id, embedding, clusterable, cluster_no, subject_id "
                "FROM photo_faces WHERE gallery = ? ORDER BY face_id",
                (gallery,),
            ).fetchall()
            clusters = cur.execute(
                "SELECT cluster_no, subject_id FROM clusters WHERE gallery = ?", (gallery,)
            ).fetchall()
            links = cur.execute(
                "SELECT face_id, cluster_no, subject_id FROM cannot_link WHERE gallery = ?",
                (gallery,),
            ).fetchall()
        n = len(rows)
        blob = b"".join(bytes(r[2]) for r in rows)
        vectors = np.frombuffer(blob, dtype="<f4").astype(np.float32).reshape(n, int(dim or 0))
        return PeopleFaces(
            model_id=model_id,
            face_ids=np.array([int(r[0]) for r in rows], np.int64),
            photo_ids=[r[1] for r in rows],
            embeddings=vectors,
            clusterable=np.array([bool(r[3]) for r in rows], bool),
            cluster_nos=np.array([0 if r[4] is None else int(r[4]) for r in rows], np.int64),
            subject_ids=[r[5] for r in rows],
            cluster_subjects={int(c): s for c, s in clusters},
            cannot_link=[(int(f), None if c is None else int(c), s) for f, c, s in links],
        )

    # --- write helpers ----------------------------------------------------------------
    def _check_model(self, cur, gallery: str, model_id: str):
        return self._gallery_for_model(cur, gallery, model_id)

    def _subject_cluster(self, cur, gallery: str, subject_id: str | None) -> int | None:
        if subject_id is None:
            return None
        row = cur.execute(
            "SELECT MIN(cluster_no) FROM clusters WHERE gallery = ? AND subject_id = ?",
            (gallery, subject_id),
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _photo_clash(
        self, cur, gallery: str, face_id: int, photo_id: str, cluster_no, subject_id
    ) -> None:
        """``Conflict`` when another face of the face's photo is in that cluster/subject."""
        for column, value in (("cluster_no", cluster_no), ("subject_id", subject_id)):
            if value is None:
                continue
            row = cur.execute(
                f"SELECT face_id FROM photo_faces WHERE gallery = ? AND photo_id = ? "
                f"AND {column} = ? AND face_id <> ?",
                (gallery, photo_id, value, int(face_id)),
            ).fetchone()
            if row is not None:
                what = cluster_name(value) if column == "cluster_no" else f"subject {value!r}"
                raise Conflict(
                    f"face {face_id} and face {int(row[0])} are of one photo: two faces of one "
                    f"photo are never one person ({what})"
                )

    def _assign(self, cur, gallery: str, face_id: int, subject_id: str, how: str) -> None:
        """Make a photo face the subject's (its enrolled face, with its log entry)."""
        row = cur.execute(
            "SELECT subject_id, enrolled_face_id, embedding, quality, model_id FROM photo_faces "
            "JOIN galleries g ON g.name = photo_faces.gallery WHERE face_id = ?",
            (int(face_id),),
        ).fetchone()
        if row[0] == subject_id and row[1] is not None:
            if how == "manual":
                cur.execute(
                    "UPDATE photo_faces SET assignment = 'manual' WHERE face_id = ?",
                    (int(face_id),),
                )
            return
        if row[0] is not None:
            self._unassign(cur, gallery, face_id)
        enrolled = int(
            cur.execute(
                "INSERT INTO faces (gallery, subject_id, embedding, model_id, quality, image, "
                "created_at) VALUES (?, ?, ?, ?, ?, NULL, ?) RETURNING face_id",
                (gallery, subject_id, bytes(row[2]), row[4], row[3], time.time()),
            ).fetchone()[0]
        )
        self._log(cur, gallery, "add", enrolled, subject_id)
        cur.execute(
            "UPDATE photo_faces SET subject_id = ?, assignment = ?, enrolled_face_id = ? "
            "WHERE face_id = ?",
            (subject_id, how, enrolled, int(face_id)),
        )
        self._audit_ids([face_id], [subject_id])

    def _unassign(self, cur, gallery: str, face_id: int) -> None:
        row = cur.execute(
            "SELECT subject_id, enrolled_face_id FROM photo_faces WHERE face_id = ?",
            (int(face_id),),
        ).fetchone()
        if row[1] is not None:
            cur.execute("DELETE FROM faces WHERE face_id = ?", (int(row[1]),))
            self._log(cur, gallery, "delete_face", int(row[1]), row[0])
        cur.execute(
            "UPDATE photo_faces SET subject_id = NULL, assignment = NULL, "
            "enrolled_face_id = NULL WHERE face_id = ?",
            (int(face_id),),
        )

    def _forbid(self, cur, gallery: str, face_id: int, cluster_no, subject_id) -> None:
        if cluster_no is None and subject_id is None:
            return
        cur.execute(
            "INSERT INTO cannot_link (gallery, face_id, cluster_no, subject_id, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (gallery, int(face_id), cluster_no, subject_id, time.time()),
        )

    def _new_cluster(self, cur, gallery: str, origin: str, subject_id: str | None = None) -> int:
        now = time.time()
        return int(
            cur.execute(
                "INSERT INTO clusters (gallery, subject_id, origin, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) RETURNING cluster_no",
                (gallery, subject_id, origin, now, now),
            ).fetchone()[0]
        )

    def _drop_if_empty(self, cur, cluster_no) -> None:
        if cluster_no is None:
            return
        left = cur.execute(
            "SELECT COUNT(*) FROM photo_faces WHERE cluster_no = ?", (int(cluster_no),)
        ).fetchone()[0]
        if not int(left):
            cur.execute("DELETE FROM clusters WHERE cluster_no = ?", (int(cluster_no),))

    def _touch(self, cur, cluster_no: int, subject_id: str | None) -> None:
        cur.execute(
            "UPDATE clusters SET subject_id = ?, origin = 'manual', updated_at = ? "
            "WHERE cluster_no = ?",
            (subject_id, time.time(), int(cluster_no)),
        )

    def _ensure_subject(self, cur, gallery: str, subject_id: str, metadata_text: str) -> None:
        if (
            cur.execute(
                "SELECT 1 FROM subjects WHERE gallery = ? AND subject_id = ?",
                (gallery, subject_id),
            ).fetchone()
            is None
        ):
            now = time.time()
            cur.execute(
                "INSERT INTO subjects (gallery, subject_id, metadata, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (gallery, subject_id, metadata_text, now, now),
            )

    def _members(self, cur, cluster_no: int) -> list[tuple[int, str, str | None]]:
        return [
            (int(f), p, s)
            for f, p, s in cur.execute(
                "SELECT face_id, photo_id, subject_id FROM photo_faces WHERE cluster_no = ? "
                "ORDER BY face_id",
                (int(cluster_no),),
            ).fetchall()
        ]

    def _check_disjoint(self, cur, gallery: str, faces, subject_id: str | None) -> None:
        """No two of ``faces`` (and the subject's other faces) share a photo."""
        seen: dict[str, int] = {}
        for face_id, photo_id, _ in faces:
            if photo_id in seen:
                raise Conflict(
                    f"face {face_id} and face {seen[photo_id]} are of one photo: two faces of "
                    "one photo are never one person"
                )
            seen[photo_id] = face_id
        if subject_id is not None:
            ids = {f for f, _, _ in faces}
            for face_id, photo_id in cur.execute(
                "SELECT face_id, photo_id FROM photo_faces WHERE gallery = ? AND subject_id = ?",
                (gallery, subject_id),
            ).fetchall():
                if int(face_id) not in ids and photo_id in seen:
                    raise Conflict(
                        f"face {seen[photo_id]} and face {int(face_id)} (of subject "
                        f"{subject_id!r}) are of one photo: two faces of one photo are never "
                        "one person"
                    )

    # --- writes -------------------------------------------------------------------
    def add_photo(
        self,
        gallery: str,
        model_id: str,
        photo_id: str,
        width: int,
        height: int,
        faces: list[NewPhotoFace],
    ) -> tuple[dict, bool, int | None]:
        results, seq = self.add_photos(
            gallery, model_id, [NewPhoto(photo_id, width, height, faces)]
        )
        found, created = results[0]
        return found, created, seq

    def add_photos(
        self, gallery: str, model_id: str, photos: list[NewPhoto]
    ) -> tuple[list[tuple[dict, bool]], int | None]:
        from service.gallery.sql import dump_json

        checked = []
        for photo in photos:
            qualities = [dump_json(f.quality or {}, "quality") for f in photo.faces]
            vectors = [
                np.ascontiguousarray(f.embedding, dtype="<f4").reshape(-1) for f in photo.faces
            ]
            subjects = [f.subject_id for f in photo.faces if f.subject_id is not None]
            if len(subjects) != len(set(subjects)):
                raise Conflict("two faces of one photo cannot be assigned to one subject")
            checked.append((photo, qualities, vectors, subjects))
        results: list[tuple[dict, bool]] = []
        with self._people_write() as cur:
            row = self._check_model(cur, gallery, model_id)
            dim = row["dim"]
            for photo, qualities, vectors, subjects in checked:
                known = self._photo_dict(cur, gallery, photo.photo_id)
                if known is not None:
                    results.append((known, False))
                    continue
                sizes = {v.size for v in vectors}
                if len(sizes) > 1 or (sizes and dim is not None and dim not in sizes):
                    raise InvalidEmbedding(f"gallery {gallery!r} holds {dim}-d embeddings")
                if sizes and dim is None:
                    dim = sizes.pop()
                    cur.execute("UPDATE galleries SET dim = ? WHERE name = ?", (dim, gallery))
                for subject_id in subjects:
                    self._require_subject(cur, gallery, subject_id)
                self._insert_photo(cur, gallery, photo, qualities, vectors)
                found = self._photo_dict(cur, gallery, photo.photo_id)
                assert found is not None
                results.append((found, True))
            seq = self._head(cur, gallery, any(created for _, created in results))
        return results, seq

    def _insert_photo(self, cur, gallery: str, photo: NewPhoto, qualities, vectors) -> None:
        now = time.time()
        cur.execute(
            "INSERT INTO photos (gallery, photo_id, width, height, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (gallery, photo.photo_id, int(photo.width), int(photo.height), now),
        )
        for face, vector, quality in zip(photo.faces, vectors, qualities, strict=True):
            face_id = int(
                cur.execute(
                    "INSERT INTO photo_faces (gallery, photo_id, embedding, box, landmarks, "
                    "quality, clusterable, thumbnail, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING face_id",
                    (
                        gallery,
                        photo.photo_id,
                        vector.tobytes(),
                        json.dumps([round(float(v), 2) for v in face.box]),
                        json.dumps([[round(float(v), 2) for v in p] for p in face.landmarks]),
                        quality,
                        int(bool(face.clusterable)),
                        face.thumbnail,
                        now,
                    ),
                ).fetchone()[0]
            )
            self._audit_ids([face_id])
            if face.subject_id is not None:
                self._assign(cur, gallery, face_id, face.subject_id, "automatic")
                home = self._subject_cluster(cur, gallery, face.subject_id)
                if home is not None:
                    cur.execute(
                        "UPDATE photo_faces SET cluster_no = ? WHERE face_id = ?",
                        (home, face_id),
                    )

    def _head(self, cur, gallery: str, changed: bool = True) -> int | None:
        """End a people write of ``gallery``: append its ``people`` change-log entry (after
        any index entries of the transaction; none when ``changed`` is false and no index
        changed) and return the newest seq, for the caller's replica to apply."""
        if changed:
            return self._append(cur, gallery, "people", None, None)
        if not cur.changes:
            return None
        return int(cur.execute("SELECT seq FROM log_head WHERE id = 1").fetchone()[0])

    def apply_clusters(
        self, gallery: str, joins: dict[int, list[int]], groups: list[list[int]]
    ) -> tuple[dict, int | None]:
        joined = created = 0
        free = (
            "UPDATE photo_faces SET cluster_no = ? WHERE gallery = ? AND face_id = ? "
            "AND cluster_no IS NULL AND subject_id IS NULL AND NOT EXISTS (SELECT 1 FROM "
            "cannot_link l WHERE l.face_id = photo_faces.face_id AND (l.cluster_no = ? OR "
            "l.subject_id = ?)) AND NOT EXISTS (SELECT 1 FROM photo_faces o WHERE "
            "o.gallery = photo_faces.gallery AND o.photo_id = photo_faces.photo_id AND "
            "(o.cluster_no = ? OR o.subject_id = ?))"
        )
        with self._people_write() as cur:
            self._require_gallery(cur, gallery)
            targets = [(int(c), list(f), False) for c, f in joins.items()]
            for face_ids in groups:
                targets.append((self._new_cluster(cur, gallery, "automatic"), list(face_ids), True))
            for number, face_ids, new in targets:
                row = cur.execute(
                    "SELECT subject_id FROM clusters WHERE gallery = ? AND cluster_no = ?",
                    (gallery, number),
                ).fetchone()
                if row is None:
                    continue  # deleted meanwhile
                subject_id = row[0]
                moved = []
                for face_id in face_ids:
                    done = cur.execute(
                        free,
                        (number, gallery, int(face_id), number, subject_id, number, subject_id),
                    ).rowcount
                    if done:
                        moved.append(int(face_id))
                if new and len(moved) < 2:
                    cur.execute(
                        "UPDATE photo_faces SET cluster_no = NULL WHERE cluster_no = ?", (number,)
                    )
                    cur.execute("DELETE FROM clusters WHERE cluster_no = ?", (number,))
                    continue
                if new:
                    created += 1
                else:
                    joined += len(moved)
                if subject_id is not None:
                    for face_id in moved:
                        self._assign(cur, gallery, face_id, subject_id, "automatic")
            seq = self._head(cur, gallery, bool(created or joined))
        return {"clusters_created": created, "faces_joined": joined}, seq

    def name_cluster(
        self, gallery: str, cluster_no: int, subject_id: str, metadata: dict | None, model_id: str
    ) -> tuple[dict, int | None]:
        from service.gallery.sql import dump_json

        text = dump_json(metadata or {}, "metadata")
        with self._people_write() as cur:
            self._check_model(cur, gallery, model_id)
            row = self._cluster_row(cur, gallery, cluster_no)
            target = self._subject_cluster(cur, gallery, subject_id)
            faces = self._members(cur, int(row[0]))
            if target is not None and target != int(row[0]):
                faces = faces + self._members(cur, target)
            self._check_disjoint(cur, gallery, faces, subject_id)
            self._ensure_subject(cur, gallery, subject_id, text)
            home = int(row[0]) if target is None else target
            for face_id, _, _ in faces:
                cur.execute(
                    "UPDATE photo_faces SET cluster_no = ? WHERE face_id = ?", (home, face_id)
                )
                self._assign(cur, gallery, face_id, subject_id, "manual")
            if home != int(row[0]):
                cur.execute("DELETE FROM clusters WHERE cluster_no = ?", (int(row[0]),))
            self._touch(cur, home, subject_id)
            self._audit_ids([f for f, _, _ in faces], [subject_id])
            seq = self._head(cur, gallery)
            cluster = self._cluster_dicts(cur, gallery, [self._cluster_row(cur, gallery, home)])[0]
        return cluster, seq

    def merge_clusters(
        self, gallery: str, target: int, source: int, model_id: str
    ) -> tuple[dict, int | None]:
        if int(target) == int(source):
            raise InvalidInput("a cluster cannot be merged with itself")
        with self._people_write() as cur:
            self._check_model(cur, gallery, model_id)
            keep = self._cluster_row(cur, gallery, target)
            gone = self._cluster_row(cur, gallery, source)
            if keep[1] is not None and gone[1] is not None and keep[1] != gone[1]:
                raise Conflict(
                    f"{cluster_name(target)} is {keep[1]!r} and {cluster_name(source)} is "
                    f"{gone[1]!r}: move faces one by one, or rename one cluster first"
                )
            subject_id = keep[1] if keep[1] is not None else gone[1]
            faces = self._members(cur, int(target)) + self._members(cur, int(source))
            self._check_disjoint(cur, gallery, faces, subject_id)
            for face_id, _, _ in faces:
                cur.execute(
                    "UPDATE photo_faces SET cluster_no = ? WHERE face_id = ?",
                    (int(target), face_id),
                )
                if subject_id is not None:
                    self._assign(cur, gallery, face_id, subject_id, "manual")
            cur.execute("DELETE FROM clusters WHERE cluster_no = ?", (int(source),))
            self._touch(cur, int(target), subject_id)
            self._audit_ids([f for f, _, _ in faces], [subject_id] if subject_id else [])
            seq = self._head(cur, gallery)
            cluster = self._cluster_dicts(cur, gallery, [self._cluster_row(cur, gallery, target)])[
                0
            ]
        return cluster, seq

    def move_face(
        self,
        gallery: str,
        face_id: int,
        model_id: str,
        cluster_no: int | None = None,
        subject_id: str | None = None,
    ) -> tuple[dict, int | None]:
        if (cluster_no is None) == (subject_id is None):
            raise InvalidInput("give the cluster_id or the subject_id to move the face to")
        with self._people_write() as cur:
            self._check_model(cur, gallery, model_id)
            row = self._face_row(cur, gallery, face_id)
            to_cluster: int | None
            if cluster_no is not None:
                target = self._cluster_row(cur, gallery, cluster_no)
                to_cluster, to_subject = int(target[0]), target[1]
            else:
                assert subject_id is not None
                self._require_subject(cur, gallery, subject_id)
                to_cluster, to_subject = self._subject_cluster(cur, gallery, subject_id), subject_id
            old_cluster, old_subject = row[6], row[7]
            self._photo_clash(cur, gallery, face_id, row[1], to_cluster, to_subject)
            if old_cluster is not None and old_cluster != to_cluster:
                self._forbid(cur, gallery, face_id, int(old_cluster), None)
            if old_subject is not None and old_subject != to_subject:
                self._forbid(cur, gallery, face_id, None, old_subject)
                self._unassign(cur, gallery, face_id)
            cur.execute(
                "UPDATE photo_faces SET cluster_no = ? WHERE face_id = ?", (to_cluster, face_id)
            )
            if to_subject is not None:
                self._assign(cur, gallery, face_id, to_subject, "manual")
            if old_cluster != to_cluster:
                self._drop_if_empty(cur, old_cluster)
            self._audit_ids([face_id], [s for s in (old_subject, to_subject) if s])
            seq = self._head(cur, gallery)
            face = _face_dict(self._face_row(cur, gallery, face_id))
        return face, seq

    def remove_face(self, gallery: str, face_id: int) -> tuple[dict, int | None]:
        with self._people_write() as cur:
            self._require_gallery(cur, gallery)
            row = self._face_row(cur, gallery, face_id)
            old_cluster, old_subject = row[6], row[7]
            if old_cluster is None and old_subject is None:
                raise InvalidInput(f"face {face_id} is in no cluster and no subject")
            self._forbid(cur, gallery, face_id, old_cluster, old_subject)
            self._unassign(cur, gallery, face_id)
            cur.execute("UPDATE photo_faces SET cluster_no = NULL WHERE face_id = ?", (face_id,))
            self._drop_if_empty(cur, old_cluster)
            self._audit_ids([face_id], [old_subject] if old_subject else [])
            seq = self._head(cur, gallery)
            face = _face_dict(self._face_row(cur, gallery, face_id))
        return face, seq

    def split_cluster(
        self, gallery: str, cluster_no: int, face_ids: list[int]
    ) -> tuple[dict, int | None]:
        with self._people_write() as cur:
            self._require_gallery(cur, gallery)
            row = self._cluster_row(cur, gallery, cluster_no)
            members = {f for f, _, _ in self._members(cur, int(row[0]))}
            chosen = list(dict.fromkeys(int(f) for f in face_ids))
            strangers = [f for f in chosen if f not in members]
            if strangers:
                raise InvalidInput(f"face(s) {strangers[:5]} are not in {cluster_name(cluster_no)}")
            if not chosen or len(chosen) == len(members):
                raise InvalidInput("a split moves some, not none or all, of a cluster's faces")
            fresh = self._new_cluster(cur, gallery, "manual")
            for face_id in chosen:
                self._forbid(cur, gallery, face_id, int(row[0]), row[1])
                if row[1] is not None:
                    self._unassign(cur, gallery, face_id)
                cur.execute(
                    "UPDATE photo_faces SET cluster_no = ? WHERE face_id = ?", (fresh, face_id)
                )
            self._touch(cur, int(row[0]), row[1])
            self._audit_ids(chosen, [row[1]] if row[1] else [])
            seq = self._head(cur, gallery)
            cluster = self._cluster_dicts(cur, gallery, [self._cluster_row(cur, gallery, fresh)])[0]
        return cluster, seq

    # --- export and restore (service.gallery.transfer) ----------------------------------
    def _export_people(self, cur, gallery: str) -> Iterator[tuple[str, dict]]:
        """The people records of ``gallery`` in the export's snapshot: photos, clusters,
        photo faces, cannot-link rules (each by id)."""
        for photo_id, width, height, created in cur.execute(
            "SELECT photo_id, width, height, created_at FROM photos WHERE gallery = ? "
            "ORDER BY photo_id",
            (gallery,),
        ).fetchall():
            yield (
                "photo",
                {
                    "photo_id": photo_id,
                    "width": int(width),
                    "height": int(height),
                    "created_at": float(created),
                },
            )
        for number, subject_id, origin in cur.execute(
            "SELECT cluster_no, subject_id, origin FROM clusters WHERE gallery = ? "
            "ORDER BY cluster_no",
            (gallery,),
        ).fetchall():
            yield ("cluster", {"cluster": int(number), "subject_id": subject_id, "origin": origin})
        cur.execute(
            f"SELECT {_FACE_COLUMNS}, embedding, thumbnail, created_at FROM photo_faces "
            "WHERE gallery = ? ORDER BY face_id",
            (gallery,),
        )
        while rows := cur.fetchmany(256):
            for row in rows:
                face = _face_dict(row)
                face["cluster"] = None if row[6] is None else int(row[6])
                del face["cluster_id"]
                face["embedding"] = bytes(row[10])
                face["thumbnail"] = None if row[11] is None else bytes(row[11])
                face["created_at"] = float(row[12])
                yield ("photo_face", face)
        # a rule's cluster may be gone since (emptied, merged away; its number is never
        # reused): such a reference says nothing any more and is left out
        for face_id, number, subject_id in cur.execute(
            "SELECT DISTINCT l.face_id, c.cluster_no, l.subject_id FROM cannot_link l "
            "LEFT JOIN clusters c ON c.cluster_no = l.cluster_no AND c.gallery = l.gallery "
            "WHERE l.gallery = ? AND (c.cluster_no IS NOT NULL OR l.subject_id IS NOT NULL) "
            "ORDER BY l.face_id, c.cluster_no, l.subject_id",
            (gallery,),
        ).fetchall():
            yield (
                "cannot_link",
                {
                    "face_id": int(face_id),
                    "cluster": None if number is None else int(number),
                    "subject_id": subject_id,
                },
            )

    def restore_gallery(
        self,
        gallery: str,
        model_id: str,
        subjects: list[NewSubject],
        faces: list[NewFace],
        face_ids: list[int],
        people: dict[str, list[dict]],
    ) -> tuple[list[dict], int | None]:
        insert = self._faces_writer(gallery, model_id, subjects, faces, True, False)
        with self._people_write() as cur:
            results, seq = insert(cur)
            if any(people.values()):
                enrolled = {old: r["face_id"] for old, r in zip(face_ids, results, strict=True)}
                self._restore_people(cur, gallery, people, enrolled)
                seq = self._head(cur, gallery)
        return results, seq

    def _restore_people(
        self, cur, gallery: str, people: dict[str, list[dict]], enrolled: dict[int, int]
    ) -> None:
        """Write exported people records (validated) into ``gallery``, whose faces were
        written just before in this transaction; ``enrolled``: exported enrolled face id ->
        its restored id.  New face and cluster numbers."""
        for photo in people["photo"]:
            cur.execute(
                "INSERT INTO photos (gallery, photo_id, width, height, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    gallery,
                    photo["photo_id"],
                    photo["width"],
                    photo["height"],
                    photo["created_at"],
                ),
            )
        clusters: dict[int, int] = {}
        for record in people["cluster"]:
            clusters[record["cluster"]] = self._new_cluster(
                cur, gallery, record["origin"], record["subject_id"]
            )
        faces: dict[int, int] = {}
        for face in people["photo_face"]:
            old = face["enrolled_face_id"]
            faces[face["face_id"]] = int(
                cur.execute(
                    "INSERT INTO photo_faces (gallery, photo_id, embedding, box, landmarks, "
                    "quality, clusterable, thumbnail, cluster_no, subject_id, assignment, "
                    "enrolled_face_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, ?) RETURNING face_id",
                    (
                        gallery,
                        face["photo_id"],
                        face["embedding"],
                        json.dumps(face["box"]),
                        json.dumps(face["landmarks"]),
                        json.dumps(face["quality"]),
                        int(bool(face["clusterable"])),
                        face["thumbnail"],
                        None if face["cluster"] is None else clusters[face["cluster"]],
                        face["subject_id"] if old is not None else None,
                        face["assignment"] if old is not None else None,
                        None if old is None else enrolled[old],
                        face["created_at"],
                    ),
                ).fetchone()[0]
            )
        for rule in people["cannot_link"]:
            self._forbid(
                cur,
                gallery,
                faces[rule["face_id"]],
                None if rule["cluster"] is None else clusters[rule["cluster"]],
                rule["subject_id"],
            )

    # --- hooks for the rest of the store ---------------------------------------------
    @staticmethod
    def _people_forget(
        cur, gallery: str, subject_id: str | None = None, face_id: int | None = None
    ) -> None:
        """Called when a subject or an enrolled face is deleted: its photo faces are no
        longer assigned (a cluster naming the subject is unnamed; a photo face whose
        enrolled face was deleted leaves its cluster)."""
        if subject_id is not None:
            cur.execute(
                "UPDATE photo_faces SET subject_id = NULL, assignment = NULL, "
                "enrolled_face_id = NULL WHERE gallery = ? AND subject_id = ?",
                (gallery, subject_id),
            )
            cur.execute(
                "UPDATE clusters SET subject_id = NULL WHERE gallery = ? AND subject_id = ?",
                (gallery, subject_id),
            )
        if face_id is not None:  # it leaves its subject's cluster too
            cur.execute(
                "UPDATE photo_faces SET subject_id = NULL, assignment = NULL, "
                "enrolled_face_id = NULL, cluster_no = NULL "
                "WHERE gallery = ? AND enrolled_face_id = ?",
                (gallery, int(face_id)),
            )


__all__ = ["PeopleSQL", "SubjectNotFound", "cluster_name", "cluster_number"]
