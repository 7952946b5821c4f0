"""Versioned schema migrations for both store backends.

A deliberately small scheme instead of Alembic: ``schema_version`` holds one
row with the current version, and ``MIGRATIONS[dialect]`` lists, per version,
the statements that lead from the previous version to it.  ``migrate`` (in
:mod:`service.gallery.sql`) applies the missing versions in order in one
transaction together with the version bumps (both engines have transactional
DDL), so a crash mid-migration leaves the previous version intact; on PostgreSQL
the transaction first takes an advisory lock, so replicas starting together
migrate once.  (Alembic would need SQLAlchemy beside the two drivers the stores
use directly, for two short lists of plain SQL.)  To change the schema, append a new version to
both dialects; never edit a released one.

Tables:

* ``galleries``  (name, model_id, dim — the model's, given at creation or set by the first
  face, created_at)
* ``subjects``   (gallery, subject_id, metadata JSON text, created_at, updated_at)
* ``faces``      (face_id — never reused, gallery, subject_id, embedding float32
  bytes, model_id, quality JSON text, optional image, created_at; since version 2
  ``source_face_id``: the face of another gallery this one was re-enrolled from,
  unique per gallery, NULL for faces enrolled from an upload); since version 3
  ``content_sha256``: the sha256 of the photo a face was enrolled from by a bulk
  import (``facegate gallery import``, ``POST /v1/galleries/{g}/faces``) or a restore,
  so that the same photo is not enrolled twice into a gallery
* ``changes``    (seq, gallery, op, face_id, subject_id, created_at) — the log; since
  version 7 ``op`` may also be ``people``: a people-discovery write of the gallery (photos,
  photo faces, clusters, cannot-link rules) that changes no index by itself
* ``audit``      (since version 4: id, at, key_id, client, action, gallery, subject_ids and
  face_ids JSON lists, result) — who enrolled, deleted, searched, exported what, and when
  (:mod:`service.gallery.audit`); ids only, never a photo or an embedding; since version 5
  ``route`` (method and path template of the request) and ``reason`` (why it was refused)
* ``photos``, ``photo_faces``, ``clusters``, ``cannot_link`` (since version 6: people
  discovery, :mod:`service.gallery.people_sql`): every photo of a library by its sha256,
  every face found in it (box, landmarks, quality, embedding, optional thumbnail) whether
  or not it belongs to a subject, the clusters faces were grouped into (a named cluster
  links a subject) and the "not this person" rules people gave
* ``log_head``   (one row: the newest seq; every write locks it first)

PostgreSQL text keys use the "C" collation so that ordering (and keyset
pagination) is by code point, as in SQLite.
"""

from __future__ import annotations

SQLITE: dict[int, list[str]] = {
    1: [
        """CREATE TABLE galleries (
            name TEXT PRIMARY KEY,
            model_id TEXT NOT NULL,
            dim INTEGER,
            created_at REAL NOT NULL)""",
        """CREATE TABLE subjects (
            gallery TEXT NOT NULL REFERENCES galleries(name) ON DELETE CASCADE,
            subject_id TEXT NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (gallery, subject_id))""",
        """CREATE TABLE faces (
            face_id INTEGER PRIMARY KEY AUTOINCREMENT,
            gallery TEXT NOT NULL,
            subject_id TEXT NOT NULL,
            embedding BLOB NOT NULL,
            model_id TEXT NOT NULL,
            quality TEXT NOT NULL DEFAULT '{}',
            image BLOB,
            created_at REAL NOT NULL,
            FOREIGN KEY (gallery, subject_id) REFERENCES subjects(gallery, subject_id)
                ON DELETE CASCADE)""",
        "CREATE INDEX faces_by_subject ON faces (gallery, subject_id)",
        """CREATE TABLE changes (
            seq INTEGER PRIMARY KEY,
            gallery TEXT NOT NULL,
            op TEXT NOT NULL CHECK (op IN ('add', 'delete_face', 'delete_subject',
                                           'delete_gallery')),
            face_id INTEGER,
            subject_id TEXT,
            created_at REAL NOT NULL)""",
        """CREATE TABLE log_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL)""",
        "INSERT INTO log_head (id, seq) VALUES (1, 0)",
    ],
    2: [
        "ALTER TABLE faces ADD COLUMN source_face_id INTEGER",
        """CREATE UNIQUE INDEX faces_by_source ON faces (gallery, source_face_id)
            WHERE source_face_id IS NOT NULL""",
    ],
    3: [
        "ALTER TABLE faces ADD COLUMN content_sha256 TEXT",
        """CREATE INDEX faces_by_content ON faces (gallery, content_sha256)
            WHERE content_sha256 IS NOT NULL""",
    ],
    4: [
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            key_id TEXT NOT NULL,
            client TEXT,
            action TEXT NOT NULL,
            gallery TEXT,
            subject_ids TEXT NOT NULL DEFAULT '[]',
            face_ids TEXT NOT NULL DEFAULT '[]',
            result TEXT NOT NULL)""",
        "CREATE INDEX audit_by_time ON audit (at)",
        "CREATE INDEX audit_by_gallery ON audit (gallery, at)",
    ],
    5: [
        "ALTER TABLE audit ADD COLUMN route TEXT",
        "ALTER TABLE audit ADD COLUMN reason TEXT",
    ],
    6: [
        """CREATE TABLE photos (
            gallery TEXT NOT NULL REFERENCES galleries(name) ON DELETE CASCADE,
            photo_id TEXT NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (gallery, photo_id))""",
        """CREATE TABLE clusters (
            cluster_no INTEGER PRIMARY KEY AUTOINCREMENT,
            gallery TEXT NOT NULL REFERENCES galleries(name) ON DELETE CASCADE,
            subject_id TEXT,
            origin TEXT NOT NULL CHECK (origin IN ('automatic', 'manual')),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL)""",
        "CREATE INDEX clusters_by_gallery ON clusters (gallery, subject_id)",
        """CREATE TABLE photo_faces (
            face_id INTEGER PRIMARY KEY AUTOINCREMENT,
            gallery TEXT NOT NULL,
            photo_id TEXT NOT NULL,
            embedding BLOB NOT NULL,
            box TEXT NOT NULL,
            landmarks TEXT NOT NULL,
            quality TEXT NOT NULL DEFAULT '{}',
            clusterable INTEGER NOT NULL,
            thumbnail BLOB,
            cluster_no BIGINT REFERENCES clusters(cluster_no) ON DELETE SET NULL,
            subject_id TEXT,
            assignment TEXT CHECK (assignment IN ('automatic', 'manual')),
            enrolled_face_id BIGINT,
            created_at REAL NOT NULL,
            FOREIGN KEY (gallery, photo_id) REFERENCES photos(gallery, photo_id)
                ON DELETE CASCADE)""",
        "CREATE INDEX photo_faces_by_photo ON photo_faces (gallery, photo_id)",
        "CREATE INDEX photo_faces_by_cluster ON photo_faces (gallery, cluster_no)",
        "CREATE INDEX photo_faces_by_subject ON photo_faces (gallery, subject_id)",
        """CREATE TABLE cannot_link (
            gallery TEXT NOT NULL,
            face_id BIGINT NOT NULL REFERENCES photo_faces(face_id) ON DELETE CASCADE,
            cluster_no BIGINT,
            subject_id TEXT,
            created_at REAL NOT NULL)""",
        "CREATE INDEX cannot_link_by_face ON cannot_link (gallery, face_id)",
    ],
    7: [
        """CREATE TABLE changes_v7 (
            seq INTEGER PRIMARY KEY,
            gallery TEXT NOT NULL,
            op TEXT NOT NULL CHECK (op IN ('add', 'delete_face', 'delete_subject',
                                           'delete_gallery', 'people')),
            face_id INTEGER,
            subject_id TEXT,
            created_at REAL NOT NULL)""",
        "INSERT INTO changes_v7 SELECT seq, gallery, op, face_id, subject_id, created_at "
        "FROM changes",
        "DROP TABLE changes",
        "ALTER TABLE changes_v7 RENAME TO changes",
    ],
}

POSTGRES: dict[int, list[str]] = {
    1: [
        """CREATE TABLE galleries (
            name TEXT COLLATE "C" PRIMARY KEY,
            model_id TEXT NOT NULL,
            dim INTEGER,
            created_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE subjects (
            gallery TEXT COLLATE "C" NOT NULL REFERENCES galleries(name) ON DELETE CASCADE,
            subject_id TEXT COLLATE "C" NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (gallery, subject_id))""",
        """CREATE TABLE faces (
            face_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            gallery TEXT COLLATE "C" NOT NULL,
            subject_id TEXT COLLATE "C" NOT NULL,
            embedding BYTEA NOT NULL,
            model_id TEXT NOT NULL,
            quality TEXT NOT NULL DEFAULT '{}',
            image BYTEA,
            created_at DOUBLE PRECISION NOT NULL,
            FOREIGN KEY (gallery, subject_id) REFERENCES subjects(gallery, subject_id)
                ON DELETE CASCADE)""",
        "CREATE INDEX faces_by_subject ON faces (gallery, subject_id)",
        """CREATE TABLE changes (
            seq BIGINT PRIMARY KEY,
            gallery TEXT COLLATE "C" NOT NULL,
            op TEXT NOT NULL CHECK (op IN ('add', 'delete_face', 'delete_subject',
                                           'delete_gallery')),
            face_id BIGINT,
            subject_id TEXT,
            created_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE log_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq BIGINT NOT NULL)""",
        "INSERT INTO log_head (id, seq) VALUES (1, 0)",
    ],
    2: [
        "ALTER TABLE faces ADD COLUMN source_face_id BIGINT",
        """CREATE UNIQUE INDEX faces_by_source ON faces (gallery, source_face_id)
            WHERE source_face_id IS NOT NULL""",
    ],
    3: [
        "ALTER TABLE faces ADD COLUMN content_sha256 TEXT",
        """CREATE INDEX faces_by_content ON faces (gallery, content_sha256)
            WHERE content_sha256 IS NOT NULL""",
    ],
    4: [
        """CREATE TABLE audit (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at DOUBLE PRECISION NOT NULL,
            key_id TEXT NOT NULL,
            client TEXT,
            action TEXT NOT NULL,
            gallery TEXT COLLATE "C",
            subject_ids TEXT NOT NULL DEFAULT '[]',
            face_ids TEXT NOT NULL DEFAULT '[]',
            result TEXT NOT NULL)""",
        "CREATE INDEX audit_by_time ON audit (at)",
        "CREATE INDEX audit_by_gallery ON audit (gallery, at)",
    ],
    5: [
        "ALTER TABLE audit ADD COLUMN route TEXT",
        "ALTER TABLE audit ADD COLUMN reason TEXT",
    ],
    6: [
        """CREATE TABLE photos (
            gallery TEXT COLLATE "C" NOT NULL REFERENCES galleries(name) ON DELETE CASCADE,
            photo_id TEXT COLLATE "C" NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (gallery, photo_id))""",
        """CREATE TABLE clusters (
            cluster_no BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            gallery TEXT COLLATE "C" NOT NULL REFERENCES galleries(name) ON DELETE CASCADE,
            subject_id TEXT COLLATE "C",
            origin TEXT NOT NULL CHECK (origin IN ('automatic', 'manual')),
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX clusters_by_gallery ON clusters (gallery, subject_id)",
        """CREATE TABLE photo_faces (
            face_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            gallery TEXT COLLATE "C" NOT NULL,
            photo_id TEXT COLLATE "C" NOT NULL,
            embedding BYTEA NOT NULL,
            box TEXT NOT NULL,
            landmarks TEXT NOT NULL,
            quality TEXT NOT NULL DEFAULT '{}',
            clusterable INTEGER NOT NULL,
            thumbnail BYTEA,
            cluster_no BIGINT REFERENCES clusters(cluster_no) ON DELETE SET NULL,
            subject_id TEXT COLLATE "C",
            assignment TEXT CHECK (assignment IN ('automatic', 'manual')),
            enrolled_face_id BIGINT,
            created_at DOUBLE PRECISION NOT NULL,
            FOREIGN KEY (gallery, photo_id) REFERENCES photos(gallery, photo_id)
                ON DELETE CASCADE)""",
        "CREATE INDEX photo_faces_by_photo ON photo_faces (gallery, photo_id)",
        "CREATE INDEX photo_faces_by_cluster ON photo_faces (gallery, cluster_no)",
        "CREATE INDEX photo_faces_by_subject ON photo_faces (gallery, subject_id)",
        """CREATE TABLE cannot_link (
            gallery TEXT COLLATE "C" NOT NULL,
            face_id BIGINT NOT NULL REFERENCES photo_faces(face_id) ON DELETE CASCADE,
            cluster_no BIGINT,
            subject_id TEXT COLLATE "C",
            created_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX cannot_link_by_face ON cannot_link (gallery, face_id)",
    ],
    7: [
        "ALTER TABLE changes DROP CONSTRAINT changes_op_check",
        """ALTER TABLE changes ADD CONSTRAINT changes_op_check CHECK (op IN ('add',
            'delete_face', 'delete_subject', 'delete_gallery', 'people'))""",
    ],
}

MIGRATIONS = {"sqlite": SQLITE, "postgresql": POSTGRES}
LATEST = max(SQLITE)
assert set(SQLITE) == set(POSTGRES), "both dialects must define the same versions"
