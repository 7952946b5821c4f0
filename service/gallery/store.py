"""The durable gallery store: one interface, two backends (SQLite, PostgreSQL).

The store is the source of truth; the FAISS index is derived from it.  Every
write that changes what an index holds (adding or deleting faces, subjects,
galleries) commits its rows **and** one change-log entry in the same
transaction.  Change-log sequence numbers come from a single counter row that
every write transaction locks first, so

* writes are serialised (one writer at a time, like SQLite itself),
* sequence numbers are gap-free (a rolled-back write also rolls back its
  increment), and
* they are assigned in commit order, so a reader that sees ``seq = n`` also
  sees every entry before it.

A follower can therefore apply the log strictly in order and treat any gap as
an error rather than something to skip.

Timestamps are seconds since the epoch (float) in the tables and ISO-8601 UTC
strings in the records returned to callers (:mod:`service.records`: a
gallery, subject, face or audit row, each mapped once from its named row).
Metadata and quality are JSON objects.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from service.records import AuditRecord, FaceRecord, GalleryRecord, SubjectRecord

if TYPE_CHECKING:
    from service.gallery.audit import AuditEntry

#: A JSON object (subject metadata, face quality, an export's or a bulk write's items);
#: galleries, subjects, faces and audit rows are typed (:mod:`service.records`).
Record: TypeAlias = dict[str, Any]

OPS = ("add", "delete_face", "delete_subject", "delete_gallery", "people")


@dataclass(frozen=True)
class Change:
    """One change-log entry, joined with what a follower needs to apply it.

    For ``add`` entries ``embedding`` is the face's vector if the face still
    exists (``None`` when a later entry already deleted it), and ``model_id`` /
    ``dim`` describe the gallery as it is now.
    """

    seq: int
    gallery: str
    op: str
    face_id: int | None
    subject_id: str | None
    embedding: np.ndarray | None = None
    model_id: str | None = None
    dim: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Change:
        """From the named columns ``seq, gallery, op, face_id, subject_id`` and, for an
        ``add``, the face's ``embedding`` bytes and the gallery's ``model_id``, ``dim``."""
        face_id, embedding, dim = row["face_id"], row.get("embedding"), row.get("dim")
        return cls(
            seq=int(row["seq"]),
            gallery=row["gallery"],
            op=row["op"],
            face_id=None if face_id is None else int(face_id),
            subject_id=row["subject_id"],
            embedding=None if embedding is None else np.frombuffer(bytes(embedding), "<f4"),
            model_id=row.get("model_id"),
            dim=None if dim is None else int(dim),
        )


@dataclass
class GalleryFaces:
    """Every face of one gallery, as read in one consistent snapshot."""

    name: str
    model_id: str
    dim: int | None
    face_ids: np.ndarray  # (n,) int64
    subject_ids: list[str]
    embeddings: np.ndarray  # (n, dim) float32


@dataclass(frozen=True)
class NewSubject:
    """A subject for :meth:`GalleryStore.write_faces` (created if absent, else left as is)."""

    subject_id: str
    metadata: Record | None = None
    created_at: float | None = None  # epoch seconds; None: now


@dataclass(frozen=True)
class NewFace:
    """A face for :meth:`GalleryStore.write_faces`."""

    subject_id: str
    embedding: np.ndarray
    quality: Record
    image: bytes | None = None
    content_sha256: str | None = None  # the photo's hash: a second face of it is not added
    created_at: float | None = None  # epoch seconds; None: now


class GalleryStore(abc.ABC):
    """What the gallery service needs from a durable store.

    Methods that mutate return the change-log ``seq`` they committed (``None``
    for writes that do not touch the index).  Methods raise the typed errors of
    :mod:`service.gallery.errors` for unknown galleries, subjects and faces and
    for model-id mismatches.
    """

    #: a short name for logs and stats ("sqlite", "postgresql")
    backend: str = ""

    # --- lifecycle ------------------------------------------------------------
    @abc.abstractmethod
    def migrate(self) -> int:
        """Bring the schema to the newest version; return that version."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every connection."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version recorded in the store (0 when empty)."""

    # --- galleries --------------------------------------------------------------
    @abc.abstractmethod
    def create_gallery(
        self, name: str, model_id: str, dim: int | None = None
    ) -> tuple[GalleryRecord, bool]:
        """Create a gallery or return the existing one (model ids must agree).  ``dim``: the
        model's embedding dimension, when known before the first face."""

    @abc.abstractmethod
    def get_gallery(self, name: str) -> GalleryRecord:
        """``name``, ``model_id``, ``dim``, ``subjects``, ``faces``, ``created_at``."""

    @abc.abstractmethod
    def list_galleries(self) -> list[GalleryRecord]:
        """Every gallery, by name."""

    @abc.abstractmethod
    def delete_gallery(self, name: str) -> int:
        """Delete a gallery with its subjects and faces; return the seq."""

    # --- subjects ---------------------------------------------------------------
    @abc.abstractmethod
    def upsert_subject(
        self,
        gallery: str,
        subject_id: str,
        metadata: Record | None,
        model_id: str,
        dim: int | None = None,
    ) -> tuple[SubjectRecord, bool]:
        """Create (and the gallery, with ``dim`` as in :meth:`create_gallery`, if needed) or
        return the existing subject unchanged."""

    @abc.abstractmethod
    def get_subject(self, gallery: str, subject_id: str) -> SubjectRecord:
        """The subject with its faces."""

    @abc.abstractmethod
    def update_subject(self, gallery: str, subject_id: str, metadata: Record) -> SubjectRecord:
        """Merge ``metadata`` into the subject's metadata (``None`` values remove keys)."""

    @abc.abstractmethod
    def delete_subject(self, gallery: str, subject_id: str) -> tuple[int, int]:
        """Delete a subject and its faces; return (faces removed, seq)."""

    @abc.abstractmethod
    def list_subjects(
        self, gallery: str, limit: int, after: str | None
    ) -> tuple[list[SubjectRecord], bool]:
        """Up to ``limit`` subjects with ``subject_id > after``; and whether more follow."""

    # --- faces ------------------------------------------------------------------
    @abc.abstractmethod
    def add_face(
        self,
        gallery: str,
        subject_id: str,
        embedding: np.ndarray,
        model_id: str,
        quality: Record,
        image: bytes | None,
        source_face_id: int | None = None,
    ) -> tuple[FaceRecord, int]:
        """Insert one face; return (its record, seq).

        ``source_face_id`` records the face (of another gallery) this one was
        re-enrolled from; a second face of ``gallery`` with the same source is
        refused with ``Conflict`` (checked under the writer lock).
        """

    @abc.abstractmethod
    def delete_face(self, gallery: str, face_id: int) -> tuple[str, int]:
        """Delete one face; return (its subject id, seq)."""

    @abc.abstractmethod
    def get_face_image(self, gallery: str, face_id: int) -> bytes | None:
        """The stored image of a face (``None`` if images are not stored)."""

    # --- many faces at once (bulk enrolment, restore: service.gallery.transfer) ---
    @abc.abstractmethod
    def write_faces(
        self,
        gallery: str,
        model_id: str,
        subjects: list[NewSubject],
        faces: list[NewFace],
        *,
        new_gallery: bool = False,
        only_with_faces: bool = False,
    ) -> tuple[list[Record], int | None]:
        """Create ``subjects`` (those absent) and add ``faces`` in **one** transaction, each
        face with its own change-log entry; return (per face ``{face_id, subject_id,
        created}``, the last seq written or ``None``).

        The gallery is created for ``model_id`` if absent; with ``new_gallery`` an existing
        gallery is refused (``Conflict``).  A face whose ``content_sha256`` is already in the
        gallery under the same subject is not added: its entry names the existing face with
        ``created=False``; under another subject it is refused: its entry is ``{face_id:
        None, subject_id, created: False, error: "photo_enrolled_elsewhere"}``, naming
        neither that subject nor its face.  ``only_with_faces``: a subject of ``subjects``
        none of whose faces is added is not created.  Every face's subject must be in
        ``subjects`` or exist already (``SubjectNotFound``).
        """

    @abc.abstractmethod
    def content_hashes(self, gallery: str) -> set[str]:
        """The ``content_sha256`` of every face of ``gallery`` (empty if it does not exist)."""

    @abc.abstractmethod
    def export_gallery(self, gallery: str) -> Iterator[tuple[str, Record]]:
        """One gallery in one consistent snapshot, as ``("gallery", {...})`` first, then
        ``("subject", {...})`` by subject id, then ``("face", {...})`` by face id (with
        ``embedding`` bytes, ``quality``, ``image`` or None, ``content_sha256``,
        ``created_at`` epoch seconds), then the people records of
        :meth:`PeopleStore.restore_gallery`.  The snapshot stays open until the iterator is
        exhausted or closed: consume it in one thread."""

    # --- audit log (see service.gallery.audit) -------------------------------------
    @abc.abstractmethod
    def append_audit(self, entries: list[AuditEntry]) -> None:
        """Append :class:`~service.gallery.audit.AuditEntry` rows in one transaction."""

    @abc.abstractmethod
    def prune_audit(self, before: float) -> int:
        """Delete audit rows older than ``before`` (epoch seconds); return how many."""

    @abc.abstractmethod
    def audit_records(
        self,
        *,
        gallery: str | None = None,
        subject_id: str | None = None,
        action: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after: int = 0,
        limit: int = 100,
        galleries: Collection[str] | None = None,
    ) -> tuple[list[AuditRecord], bool]:
        """Up to ``limit`` audit rows with ``id > after`` matching the filters (``since``
        inclusive, ``until`` exclusive, epoch seconds; ``subject_id``: rows naming it;
        ``galleries``: only rows of these galleries), oldest first; and whether more follow."""

    # --- re-enrolment (see service.reenrol) -------------------------------------
    @abc.abstractmethod
    def image_counts(self, gallery: str) -> tuple[int, int]:
        """(faces, faces with a stored image) of one gallery."""

    @abc.abstractmethod
    def face_images(
        self, gallery: str, after: int, limit: int
    ) -> list[tuple[int, str, bytes | None]]:
        """Up to ``limit`` faces with ``face_id > after``, by face id: (face_id, subject_id,
        stored image or ``None``)."""

    @abc.abstractmethod
    def reenrolled_sources(self, gallery: str) -> set[int]:
        """The ``source_face_id`` of every face of ``gallery`` that has one."""

    # --- change log and index building -----------------------------------------
    @abc.abstractmethod
    def head_seq(self) -> int:
        """The newest committed change-log seq (0 when the log is empty)."""

    @abc.abstractmethod
    def changes_after(self, seq: int, limit: int = 1000, upto: int | None = None) -> list[Change]:
        """Entries with ``seq < s <= upto`` (all when ``upto`` is None), oldest first."""

    @abc.abstractmethod
    def load_all(self) -> tuple[int, list[GalleryFaces]]:
        """(head seq, every gallery's faces), read in one consistent snapshot."""

    @abc.abstractmethod
    def subject_faces(self, gallery: str, subject_id: str) -> GalleryFaces:
        """One subject's faces with their embeddings, by face id (none: empty arrays)."""

    @abc.abstractmethod
    def face_ids(self, gallery: str) -> np.ndarray:
        """Sorted face ids of one gallery (for verifying an index against the store)."""

    @abc.abstractmethod
    def index_contents(self) -> tuple[int, dict[str, tuple[np.ndarray, list[str]]]]:
        """(head seq, gallery -> (face ids ascending, their subject ids)) for every gallery,
        read in one consistent snapshot: what every index should hold at that seq."""

    @abc.abstractmethod
    def stats(self) -> list[Record]:
        """Per gallery: ``name``, ``model_id``, ``subjects``, ``faces``."""

    # --- waking the follower ----------------------------------------------------
    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        """Block until another writer may have committed, ``timeout`` passes or ``stop`` is set.

        The default polls (waits on ``stop`` for ``timeout``); PostgreSQL wakes
        early on ``NOTIFY``.
        """
        stop.wait(timeout)


# --- people discovery (photos, their faces, clusters; see service.gallery.people_sql) ---
@dataclass(frozen=True)
class NewPhotoFace:
    """A face found in a photo, for :meth:`PeopleStore.add_photo`."""

    embedding: np.ndarray
    box: list[float]
    landmarks: list[list[float]]
    quality: Record
    clusterable: bool  # passed the clustering quality gate
    thumbnail: bytes | None = None
    subject_id: str | None = None  # an automatic assignment to this subject


@dataclass(frozen=True)
class NewPhoto:
    """A photo with its faces, for :meth:`PeopleStore.add_photos`."""

    photo_id: str
    width: int
    height: int
    faces: list[NewPhotoFace]


@dataclass
class PeopleFaces:
    """Every photo face of one gallery, as read in one snapshot, for clustering."""

    model_id: str
    face_ids: np.ndarray  # (n,) int64
    photo_ids: list[str]
    embeddings: np.ndarray  # (n, dim) float32
    clusterable: np.ndarray  # (n,) bool
    cluster_nos: np.ndarray  # (n,) int64, 0: in no cluster
    subject_ids: list[str | None]
    cluster_subjects: dict[int, str | None]  # every cluster -> the subject it names
    cannot_link: list[tuple[int, int | None, str | None]]  # (face, cluster, subject)


class PeopleStore(abc.ABC):
    """What people discovery needs from the store (one transaction per method, each with
    the change-log entries of the enrolled faces it adds or deletes, and its audit row).

    Photo faces (``face_id``) are their own rows; a face assigned to a subject also has an
    enrolled face (``enrolled_face_id``) of that subject, which the index searches.
    Clusters are named ``c<number>`` to callers and by their number here.
    """

    @abc.abstractmethod
    def get_photo(self, gallery: str, photo_id: str) -> Record | None:
        """A photo with its faces, or None if the gallery does not hold it."""

    @abc.abstractmethod
    def add_photo(
        self,
        gallery: str,
        model_id: str,
        photo_id: str,
        width: int,
        height: int,
        faces: list[NewPhotoFace],
    ) -> tuple[Record, bool, int | None]:
        """Store a photo and its faces (assigning those with a ``subject_id``); return
        (the photo as :meth:`get_photo`, created, last seq).  A photo already held is
        returned unchanged with ``created=False``."""

    @abc.abstractmethod
    def add_photos(
        self, gallery: str, model_id: str, photos: list[NewPhoto]
    ) -> tuple[list[tuple[Record, bool]], int | None]:
        """:meth:`add_photo` for many photos in **one** transaction: per photo (the photo,
        created), and the last seq."""

    @abc.abstractmethod
    def people_faces(self, gallery: str) -> PeopleFaces:
        """Every photo face of ``gallery`` with what clustering needs."""

    @abc.abstractmethod
    def apply_clusters(
        self, gallery: str, joins: dict[int, list[int]], groups: list[list[int]]
    ) -> tuple[Record, int | None]:
        """Put faces in no cluster and no subject into existing clusters (``joins``) and
        into new clusters (``groups``), skipping any face a constraint now forbids there;
        a face joining a named cluster becomes its subject's (automatically).  Returns
        counts and the last seq."""

    @abc.abstractmethod
    def list_clusters(
        self, gallery: str, limit: int, after: tuple[int, int] | None
    ) -> tuple[list[Record], bool]:
        """Clusters largest first (then by number), after ``(size, number)``; more?"""

    @abc.abstractmethod
    def get_cluster(self, gallery: str, cluster_no: int) -> Record:
        """One cluster with its faces (``ClusterNotFound``)."""

    @abc.abstractmethod
    def get_photo_face(self, gallery: str, face_id: int) -> Record:
        """One photo face (``FaceNotFound``)."""

    @abc.abstractmethod
    def face_thumbnail(self, gallery: str, face_id: int) -> bytes | None:
        """The stored thumbnail of a photo face (None: thumbnails were off)."""

    @abc.abstractmethod
    def name_cluster(
        self, gallery: str, cluster_no: int, subject_id: str, metadata: Record | None, model_id: str
    ) -> tuple[Record, int | None]:
        """Link a cluster to a subject (created if absent); its faces become the subject's.
        A subject another cluster already names takes this cluster in (a merge)."""

    @abc.abstractmethod
    def merge_clusters(
        self, gallery: str, target: int, source: int, model_id: str
    ) -> tuple[Record, int | None]:
        """Move every face of ``source`` into ``target`` and delete ``source``."""

    @abc.abstractmethod
    def move_face(
        self,
        gallery: str,
        face_id: int,
        model_id: str,
        cluster_no: int | None = None,
        subject_id: str | None = None,
    ) -> tuple[Record, int | None]:
        """Move a face to another cluster or subject; it never goes back automatically."""

    @abc.abstractmethod
    def remove_face(self, gallery: str, face_id: int) -> tuple[Record, int | None]:
        """Take a face out of its cluster and subject ("not this person", which sticks)."""

    @abc.abstractmethod
    def split_cluster(
        self, gallery: str, cluster_no: int, face_ids: list[int]
    ) -> tuple[Record, int | None]:
        """Move ``face_ids`` of a cluster into a new cluster (unnamed); return it."""

    @abc.abstractmethod
    def restore_gallery(
        self,
        gallery: str,
        model_id: str,
        subjects: list[NewSubject],
        faces: list[NewFace],
        face_ids: list[int],
        people: dict[str, list[Record]],
    ) -> tuple[list[Record], int | None]:
        """Create gallery ``gallery`` (``Conflict`` if it exists) with ``subjects`` and
        ``faces`` as :meth:`GalleryStore.write_faces` does and the people records of an
        export (``photo``, ``cluster``, ``photo_face``, ``cannot_link`` lists, as
        :meth:`GalleryStore.export_gallery` yields them after the faces), in **one**
        transaction: all of it or, on any failure, nothing.  ``face_ids``: the exported id
        of each face (the people records' ``enrolled_face_id`` refer to them).  Returns
        ``write_faces``'s results and the last seq written."""
