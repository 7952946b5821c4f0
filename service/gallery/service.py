"""``GalleryService``: the durable store plus one FAISS index per gallery, kept in sync.

Reads of records (galleries, subjects) go to the store; ``search`` goes to the
in-memory indexes.  The indexes are derived state, rebuilt from the store at
start-up (or loaded from a snapshot verified against it) and then kept fresh
by applying the store's change log strictly in ``seq`` order:

* a write made through this service commits (rows + log entry in one
  transaction) and is then applied to this service's indexes before the call
  returns, so it is visible to ``search`` here immediately;
* a background follower applies everybody else's entries: it wakes every
  ``settings.sync_interval_s`` (and at once on a PostgreSQL ``NOTIFY``), reads
  the store's head and applies every entry after ``applied_seq``.

A *sync* is one such cycle that read the head and applied everything up to it
(the initial build counts as one).  The replica is ready while its last sync
succeeded and began less than ``settings.sync_unready_after_s`` ago; a
follower whose store is unreachable, or that has fallen that far behind, makes
it not ready (``sync_status``), and the next successful sync makes it ready
again.

Entries are applied exactly once and in order; both paths share one lock and
the ``applied_seq`` counter.  The log is gap-free by construction, so a gap
means the log was tampered with: the service logs it and rebuilds every index
from the store rather than skipping anything.

The indexes, their log position and the follower are this service's
:class:`~service.gallery.replica.Replica`; index snapshots live in
:mod:`service.gallery.snapshots`.  Every public method is synchronous and thread-safe.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from service.gallery.backends import open_store
from service.gallery.errors import (
    GalleryModelMismatch,
    InvalidCursor,
    InvalidEmbedding,
    InvalidInput,
)
from service.gallery.index import INDEX_TYPES
from service.gallery.names import check_gallery, check_subject_id
from service.gallery.replica import Replica
from service.gallery.snapshots import Snapshots
from service.gallery.store import Change, GalleryFaces, GalleryStore
from service.records import FaceRecord, GalleryRecord, SubjectRecord

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-3
MAX_NAME_LENGTH = 128
MAX_PAGE = 1000
CHECK_ATTEMPTS = 3  # check_index re-reads the store this often while writes keep moving it


def check_name(value: object, what: str) -> str:
    """A model id: 1-128 printable characters (gallery names and subject ids:
    :mod:`service.gallery.names`)."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
        raise InvalidInput(f"{what} must be a string of 1 to {MAX_NAME_LENGTH} characters")
    if not value.isprintable():
        raise InvalidInput(f"{what} must not contain control characters")
    return value


def check_model(gallery: str, current: str, wanted: str) -> None:
    """The one model-id check of a read: ``gallery`` (of model ``current``) may only be used
    with embeddings of that model.  (The store checks writes inside their transaction.)"""
    if current != wanted:
        raise GalleryModelMismatch(gallery, current, wanted)


def check_dim(value: object) -> int | None:
    """An embedding dimension: a positive integer, or None (set by the first face)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInput("dim must be a positive integer")
    return int(value)


def check_vectors(value: object, dim: int | None = None, *, batch: bool) -> np.ndarray:
    """A float32 copy of one embedding (``batch=False``) or an ``(n, dim)`` batch.

    Refuses wrong shapes, non-float dtypes, non-finite values, a dimension other
    than ``dim`` and vectors whose L2 norm is not 1 (within ``NORM_TOLERANCE``).
    """
    array = np.asarray(value)
    want = 2 if batch else 1
    if array.ndim != want or array.size == 0:
        shape = "(n, dim)" if batch else "(dim,)"
        raise InvalidEmbedding(f"expected an embedding array of shape {shape}, got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidEmbedding(f"embeddings must be floating point, got {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if dim is not None and array.shape[-1] != dim:
        raise InvalidEmbedding(f"expected {dim}-d embeddings, got {array.shape[-1]}-d")
    if not np.isfinite(array).all():
        raise InvalidEmbedding("embeddings must be finite")
    norms = np.linalg.norm(array, axis=-1)
    if np.abs(norms - 1.0).max() > NORM_TOLERANCE:
        raise InvalidEmbedding("embeddings must be L2-normalised (norm 1)")
    return array


def encode_cursor(gallery: str, subject_id: str) -> str:
    """An opaque page cursor: the gallery and the last subject id of the page (base64url)."""
    raw = json.dumps([gallery, subject_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(gallery: str, cursor: str) -> str:
    """The subject id after which the page starts; :class:`InvalidCursor` unless ``cursor``
    is exactly what :func:`encode_cursor` made for this ``gallery``."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        raw = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
        bound, after = json.loads(raw)
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        raise InvalidCursor(
            "invalid pagination cursor: pass back a next_cursor unchanged"
        ) from None
    if bound != gallery or not isinstance(after, str) or encode_cursor(gallery, after) != cursor:
        raise InvalidCursor(
            "invalid pagination cursor: it belongs to another gallery or was "
            "changed; pass back a next_cursor of this gallery unchanged"
        )
    return after


class GalleryService:
    """The gallery API used by the REST layer (see ``service/gallery/__init__.py``)."""

    def __init__(
        self, settings: Settings, store: GalleryStore | None = None, *, indexing: bool = True
    ) -> None:
        if settings.index_type not in INDEX_TYPES:  # Settings built without validation
            raise ValueError(
                f"index_type must be one of {INDEX_TYPES}, got {settings.index_type!r}"
            )
        self.settings = settings
        self.store_url = settings.resolved_store_url
        self.indexing = indexing
        self._store = store
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu = bool(settings.faiss_gpu) and faiss.get_num_gpus() > 0
        #: The indexes, their log position and the follower (``replica.py``).
        self.replica = Replica(settings, self._gpu, lambda: self.store)
        self.source = ""  # where the indexes came from at start: "snapshot" or "store"
        self.snapshots = Snapshots(
            Path(settings.data_dir), self.store_url, self.replica.index_settings
        )
        self.snapshot_dir = self.snapshots.directory

    # --- lifecycle --------------------------------------------------------------
    @classmethod
    def offline(cls, settings: Settings) -> GalleryService:
        """The store (migrated) without indexes, follower or snapshots: for commands that
        write while no server runs.  Writes still commit their change-log entries, which
        servers apply when they start (or follow, when they run).  Close with ``stop()``."""
        service = cls(settings, indexing=False)
        service._store = open_store(service.store_url)
        service._store.migrate()
        return service

    @property
    def store(self) -> GalleryStore:
        if self._store is None:
            raise RuntimeError("the gallery service is not started")
        return self._store

    def start(self) -> None:
        """Open the store, migrate, build or load the indexes, start following the log."""
        if self.settings.faiss_threads > 0:
            # Process-wide; FAISS is the service's only OpenMP user.  Searches come
            # a few queries at a time from many request threads, where extra OpenMP
            # threads only add overhead (see BENCHMARKS.md).
            faiss.omp_set_num_threads(self.settings.faiss_threads)
        if self._store is None:
            self._store = open_store(self.store_url)
        self._store.migrate()
        began = time.monotonic()
        replica = self.replica
        with replica.lock:
            if self._snapshots_enabled() and self._load_snapshots():
                self.source = "snapshot"
            else:
                replica.rebuild()
                self.source = "store"
            replica.record_sync(began, replica.applied_seq)
        self._stop.clear()
        self._thread = threading.Thread(
            target=replica.follow, args=(self._stop,), name="gallery-follower", daemon=True
        )
        self._thread.start()
        self._ready.set()

    def stop(self) -> None:
        """Stop the follower, write snapshots (if enabled) and close the store."""
        self._ready.clear()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._store is not None:
            if self.indexing and self._snapshots_enabled():
                try:
                    self.write_snapshots()
                except Exception:  # a failed snapshot only costs a rebuild later
                    log.exception("writing gallery snapshots failed")
            self._store.close()
            self._store = None

    def ready(self) -> bool:
        return self._ready.is_set() and self._thread is not None and self._thread.is_alive()

    def sync_status(self) -> dict:
        """This replica's replication state, from its own bookkeeping (no store round trip,
        so it answers at once even while the store does not):

        ``ready`` (see the module docstring) with the ``reason`` when not, ``applied_seq``,
        ``head_seq`` (the store's head as last read, or this replica's own newer write),
        ``lag`` (entries between them not applied yet), ``last_synced_age_s`` (since the
        last successful sync began) and ``fresh`` (that age is within ``sync_bound_s``).
        """
        return self.replica.sync_status(self.ready())

    # --- galleries --------------------------------------------------------------
    def create_gallery(self, name: str, model_id: str, dim: int | None = None) -> GalleryRecord:
        """Create a gallery; idempotent for the same model id, else ``GalleryModelMismatch``.
        ``dim``: the model's embedding dimension (a new gallery reports it before its first
        face)."""
        gallery, _ = self.store.create_gallery(
            check_gallery(name), check_name(model_id, "model_id"), check_dim(dim)
        )
        return gallery

    def get_gallery(self, name: str) -> GalleryRecord:
        return self.store.get_gallery(check_gallery(name))

    def list_galleries(self) -> list[GalleryRecord]:
        return self.store.list_galleries()

    def delete_gallery(self, name: str) -> None:
        seq = self.store.delete_gallery(check_gallery(name))
        self._apply_own(Change(seq, name, "delete_gallery", None, None))

    # --- subjects ---------------------------------------------------------------
    def upsert_subject(
        self,
        gallery: str,
        subject_id: str,
        metadata: dict | None,
        model_id: str,
        dim: int | None = None,
    ) -> tuple[SubjectRecord, bool]:
        """Create a subject (and the gallery, with ``model_id`` and ``dim``, on first use).

        Idempotent: for an existing subject it returns that subject unchanged
        with ``created=False`` (``metadata`` is then ignored; metadata changes
        go through :meth:`update_subject`).  ``metadata`` is still validated.
        """
        return self.store.upsert_subject(
            check_gallery(gallery),
            check_subject_id(subject_id),
            metadata,
            check_name(model_id, "model_id"),
            check_dim(dim),
        )

    def get_subject(self, gallery: str, subject_id: str) -> SubjectRecord:
        return self.store.get_subject(check_gallery(gallery), check_subject_id(subject_id))

    def update_subject(self, gallery: str, subject_id: str, metadata: dict) -> SubjectRecord:
        """Merge ``metadata`` into the subject's (top-level keys; a ``None`` value removes a
        key)."""
        return self.store.update_subject(
            check_gallery(gallery), check_subject_id(subject_id), metadata
        )

    def delete_subject(self, gallery: str, subject_id: str) -> int:
        """Delete a subject and its faces; return how many faces were removed."""
        removed, seq = self.store.delete_subject(
            check_gallery(gallery), check_subject_id(subject_id)
        )
        self._apply_own(Change(seq, gallery, "delete_subject", None, subject_id))
        return removed

    def list_subjects(
        self, gallery: str, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[SubjectRecord], str | None]:
        """A page of subjects ordered by subject_id, and the cursor of the next page (or None)."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be an integer from 1 to {MAX_PAGE}")
        gallery = check_gallery(gallery)
        after = None if cursor is None else decode_cursor(gallery, cursor)
        subjects, more = self.store.list_subjects(gallery, limit, after)
        next_cursor = encode_cursor(gallery, subjects[-1].subject_id) if more and subjects else None
        return subjects, next_cursor

    # --- faces ------------------------------------------------------------------
    def add_face(
        self,
        gallery: str,
        subject_id: str,
        embedding: np.ndarray,
        model_id: str,
        quality: dict,
        image: bytes | None = None,
        source_face_id: int | None = None,
    ) -> FaceRecord:
        """Store one face (committed before this returns) and index it here at once.

        The image is kept only when ``settings.store_images`` is set.  ``source_face_id``:
        the face this one was re-enrolled from (see ``GalleryStore.add_face``).
        """
        vector = check_vectors(embedding, batch=False)
        if source_face_id is not None and (
            isinstance(source_face_id, bool) or not isinstance(source_face_id, (int, np.integer))
        ):
            raise InvalidInput("source_face_id must be an integer")
        face, seq = self.store.add_face(
            check_gallery(gallery),
            check_subject_id(subject_id),
            vector,
            check_name(model_id, "model_id"),
            quality,
            image if self.settings.store_images else None,
            None if source_face_id is None else int(source_face_id),
        )
        self._apply_own(
            Change(seq, gallery, "add", face.face_id, subject_id, vector, model_id, vector.size)
        )
        return face

    def delete_face(self, gallery: str, face_id: int) -> None:
        if isinstance(face_id, bool) or not isinstance(face_id, (int, np.integer)):
            raise InvalidInput("face_id must be an integer")
        subject_id, seq = self.store.delete_face(check_gallery(gallery), int(face_id))
        self._apply_own(Change(seq, gallery, "delete_face", int(face_id), subject_id))

    def subject_faces(self, gallery: str, subject_id: str, model_id: str) -> GalleryFaces:
        """One subject's enrolled faces with their embeddings, read from the store.

        For comparing a probe with one subject exactly, whatever the index type (an
        approximate index may not return every face of a subject).
        """
        faces = self.store.subject_faces(check_gallery(gallery), check_subject_id(subject_id))
        check_model(gallery, faces.model_id, model_id)
        return faces

    def search(
        self, gallery: str, queries: np.ndarray, top_k: int, model_id: str
    ) -> list[list[dict]]:
        """Per query, up to ``top_k`` subjects ``{subject_id, similarity, face_id}``.

        Subjects are ranked by cosine similarity of their best face (max
        fusion); ``face_id`` names that face.
        """
        check_gallery(gallery)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InvalidInput("top_k must be a positive integer")
        empty = np.asarray(queries).size == 0  # no faces in the probe image
        vectors = None if empty else check_vectors(queries, batch=True)
        # The index here, or (no face indexed here yet) the store, says what the gallery is.
        index = self.replica.indexes.get(gallery)
        if index is not None:
            current, dim = index.model_id, index.dim
        else:
            info = self.store.get_gallery(gallery)  # GalleryNotFound
            current, dim = info["model_id"], info["dim"]
        check_model(gallery, current, model_id)
        if vectors is None:
            return []
        if dim is not None and vectors.shape[1] != dim:
            raise InvalidEmbedding(f"expected {dim}-d embeddings, got {vectors.shape[1]}-d")
        if index is None:
            return [[] for _ in range(len(vectors))]
        return index.search(vectors, top_k)

    def stats(self) -> dict:
        """Galleries with their sizes in the store and in this replica's index."""
        galleries = self.store.stats()
        for gallery in galleries:
            index = self.replica.indexes.get(gallery["name"])
            gallery["indexed"] = 0 if index is None else len(index)
            if index is not None:
                gallery["index"] = index.describe()
        return {
            "backend": self.store.backend,
            "index_type": self.settings.index_type,
            "gpu": self._gpu,
            "applied_seq": self.replica.applied_seq,
            "source": self.source,
            "galleries": galleries,
            "subjects": sum(g["subjects"] for g in galleries),
            "faces": sum(g["faces"] for g in galleries),
        }

    def index_face_ids(self, gallery: str) -> np.ndarray:
        """Sorted face ids this replica's index holds for ``gallery`` (for checks and tests)."""
        index = self.replica.indexes.get(gallery)
        return np.zeros(0, np.int64) if index is None else index.face_ids()

    def check_index(self, examples: int = 5) -> dict:
        """Compare every index of this replica with the store, exactly, at one seq.

        Under the apply lock (this replica's writes wait), reads every gallery's face ids
        and subjects with the head seq in one consistent store read, applies the log up to
        that seq and compares each gallery (:func:`compare_gallery`: the face ids FAISS
        itself holds and the face -> subject mapping).  While other replicas keep writing,
        a difference found when the store has moved on is re-checked up to
        ``CHECK_ATTEMPTS`` times.  Costs one read of every face id: an operator's check.
        """
        with self.replica.lock:
            for _ in range(CHECK_ATTEMPTS):
                head, stored = self.store.index_contents()
                self.replica.catch_up_to(head)
                galleries = self.replica.compare(stored, examples)
                consistent = all(g["consistent"] for g in galleries)
                if consistent or self.store.head_seq() == head:
                    break
        return {
            "consistent": consistent,
            "seq": head,
            "applied_seq": self.replica.applied_seq,
            "galleries": galleries,
        }

    # --- applying the change log (``Replica``) ------------------------------------
    def _apply_own(self, change: Change) -> None:
        """Apply a write this service just committed (and anything before it first)."""
        if self.indexing:
            self.replica.apply_own(change)

    def sync_to(self, seq: int | None) -> None:
        """Apply the log up to ``seq``, a write this process just committed through the
        store directly (bulk writes: :mod:`service.gallery.transfer`)."""
        if seq is None or not self.indexing:
            return
        replica = self.replica
        with replica.lock:
            if replica.applied_seq < seq:
                replica.catch_up_to(seq)

    def catch_up(self) -> int:
        """Sync with the store now (:meth:`Replica.catch_up`); the new ``applied_seq``."""
        return self.replica.catch_up()

    # --- snapshots --------------------------------------------------------------
    def _snapshots_enabled(self) -> bool:
        return bool(self.settings.gallery_snapshots)

    def write_snapshots(self) -> int:
        """Write every index with the seq it reflects (:class:`Snapshots`); return that seq."""
        with self.replica.lock:
            seq = self.replica.applied_seq
            self.snapshots.write(self.replica.indexes, seq)
        return seq

    def _load_snapshots(self) -> bool:
        """Load the snapshot set, catch it up from the log and verify it; False to rebuild."""
        found = self.snapshots.read(self.store.head_seq())
        if found is None:
            return False
        replica = self.replica
        replica.indexes, seq = found
        replica.applied_seq = seq
        replica.catch_up_to()
        for _ in range(3):
            if self._verify():
                log.info(
                    "gallery indexes loaded from snapshot seq %d, caught up to %d",
                    seq,
                    replica.applied_seq,
                )
                return True
            replica.catch_up_to()  # the store may have moved on while we compared
        log.warning("gallery snapshot disagrees with the store; rebuilding")
        return False

    def _verify(self) -> bool:
        """Is every index of the store's model id and embedding dimension, and does it hold
        exactly the store's faces (``Replica.compare``, as ``check_index``)?"""
        stored = {g["name"]: g for g in self.store.stats()}
        for name, index in self.replica.indexes.items():
            gallery = stored.get(name)
            if gallery is None or (index.model_id, index.dim) != (
                gallery["model_id"],
                gallery["dim"],
            ):
                return False
        _, contents = self.store.index_contents()
        return all(g["consistent"] for g in self.replica.compare(contents))
