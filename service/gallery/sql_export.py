"""The store's bulk reads of one gallery: its export stream and its stored images."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.gallery.sql_dialect import Cursor

EXPORT_CHUNK = 256  # faces fetched at a time by export_gallery


class ExportSQL:
    """Export reads over :class:`~service.gallery.sql.SQLStore`'s transactions (mixed
    into it)."""

    if TYPE_CHECKING:  # provided by SQLStore

        def _read(self) -> AbstractContextManager[Cursor]: ...
        def _require_gallery(self, cur: Cursor, name: str) -> Any: ...
        def _export_people(self, cur: Cursor, gallery: str) -> Iterator[tuple[str, dict]]: ...

    def export_gallery(self, gallery: str) -> Iterator[tuple[str, dict]]:
        with self._read() as cur:
            row = self._require_gallery(cur, gallery)
            yield (
                "gallery",
                {
                    "name": row["name"],
                    "model_id": row["model_id"],
                    "dim": row["dim"],
                    "created_at": float(row["created_at"]),
                },
            )
            rows = cur.execute(
                "SELECT subject_id, metadata, created_at FROM subjects WHERE gallery = ? "
                "ORDER BY subject_id",
                (gallery,),
            ).fetchall()
            for subject_id, metadata, created in rows:
                yield (
                    "subject",
                    {
                        "subject_id": subject_id,
                        "metadata": json.loads(metadata),
                        "created_at": float(created),
                    },
                )
            cur.execute(
                "SELECT face_id, subject_id, embedding, quality, image, created_at, "
                "content_sha256 FROM faces WHERE gallery = ? ORDER BY face_id",
                (gallery,),
            )
            while rows := cur.fetchmany(EXPORT_CHUNK):
                for face_id, subject_id, embedding, quality, image, created, digest in rows:
                    yield (
                        "face",
                        {
                            "face_id": int(face_id),
                            "subject_id": subject_id,
                            "embedding": bytes(embedding),
                            "quality": json.loads(quality),
                            "image": None if image is None else bytes(image),
                            "created_at": float(created),
                            "content_sha256": digest,
                        },
                    )
            yield from self._export_people(cur, gallery)

    def image_counts(self, gallery: str) -> tuple[int, int]:
        with self._read() as cur:
            self._require_gallery(cur, gallery)
            faces, images = cur.execute(
                "SELECT COUNT(*), COUNT(image) FROM faces WHERE gallery = ?", (gallery,)
            ).fetchone()
        return int(faces), int(images)

    def face_images(
        self, gallery: str, after: int, limit: int
    ) -> list[tuple[int, str, bytes | None]]:
        with self._read() as cur:
            self._require_gallery(cur, gallery)
            rows = cur.execute(
                "SELECT face_id, subject_id, image FROM faces WHERE gallery = ? AND face_id > ? "
                "ORDER BY face_id LIMIT ?",
                (gallery, int(after), int(limit)),
            ).fetchall()
        return [(int(f), s, None if img is None else bytes(img)) for f, s, img in rows]

    def reenrolled_sources(self, gallery: str) -> set[int]:
        with self._read() as cur:
            self._require_gallery(cur, gallery)
            rows = cur.execute(
                "SELECT source_face_id FROM faces WHERE gallery = ? AND source_face_id IS NOT NULL",
                (gallery,),
            ).fetchall()
        return {int(r[0]) for r in rows}
