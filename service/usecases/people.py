"""People discovery: every face of every photo, grouped into people, corrected by hand.

Plain functions over the gallery service (``service.gallery``) and the pipeline's
decisions, shared by the HTTP routes (``service.api.people``) and the CLI
(``service.commands.people``):

* :func:`add_photo`: store a photo's faces (photo id = sha256 of its bytes, so the same
  photo twice adds nothing), each marked clusterable or not by the quality gate
  (:func:`gate`), and assign a face to the gallery's best matching subject when the match
  clears ``settings.people_assign_point`` (automatic, never confused with a manual one);
* :func:`run_clustering`: group the faces in no cluster and no subject
  (:mod:`service.gallery.clustering`, parameters from the recognizer card), letting new
  faces join existing clusters; a person's decisions are never reshuffled;
* corrections (:func:`name_cluster`, :func:`merge_clusters`, :func:`move_face`,
  :func:`remove_face`, :func:`split_cluster`): one store transaction each.

Every write is applied to this replica's index before the function returns (other
replicas follow the change log).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from service.gallery.clustering import ClusterParams, cluster, params_from_card
from service.gallery.errors import InvalidInput
from service.gallery.names import check_gallery, check_subject_id
from service.gallery.people_sql import cluster_name, cluster_number
from service.gallery.service import GalleryService, check_model, decode_cursor, encode_cursor
from service.gallery.store import NewPhotoFace, PeopleStore
from service.pipeline.decision import decide, operating_point, threshold_for

if TYPE_CHECKING:
    from service.config import Settings
    from service.pipeline.faces import Faces
    from service.registry import ModelCard

THUMBNAIL_QUALITY = 85  # JPEG quality of the stored face thumbnails
MAX_PAGE = 1000


class TooManyFaces(InvalidInput):
    """More faces than one request may cluster (``people_max_cluster_faces``)."""

    code = "too_many_faces"
    status = 413


@dataclass(frozen=True)
class PhotoResult:
    photo_id: str
    created: bool
    faces: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"photo_id": self.photo_id, "created": self.created, "faces": self.faces}


@dataclass(frozen=True)
class ClusterRun:
    faces: int  # faces that took part (clusterable, not assigned outside a cluster)
    clusters: int  # clusters in the gallery after the run
    clusters_created: int
    faces_joined: int  # faces that joined existing clusters
    outliers: int  # faces that took part and are in no cluster
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "faces": self.faces,
            "clusters": self.clusters,
            "clusters_created": self.clusters_created,
            "faces_joined": self.faces_joined,
            "outliers": self.outliers,
            "seconds": round(self.seconds, 3),
            "params": self.params,
        }


def people_store(gallery: GalleryService) -> PeopleStore:
    store = gallery.store
    if not isinstance(store, PeopleStore):  # every SQL store is one
        raise RuntimeError(f"the {store.backend} store does not support people discovery")
    return store


def photo_id(data: bytes) -> str:
    """A photo's id: the sha256 of its bytes (hex)."""
    return hashlib.sha256(data).hexdigest()


def gate(quality: dict[str, float], settings: Settings) -> list[str]:
    """Why a face is left out of clustering (empty: it takes part): ``face_too_small``,
    ``low_detection_score``, ``blurred_face`` against the ``people_min_*`` settings."""
    reasons = []
    if quality.get("face_size_px", 0.0) < settings.people_min_face_size:
        reasons.append("face_too_small")
    if quality.get("det_score", 0.0) < settings.people_min_det_score:
        reasons.append("low_detection_score")
    floor = settings.people_min_sharpness
    if floor > 0 and quality.get("sharpness", 0.0) < floor:
        reasons.append("blurred_face")
    return reasons


def cluster_params(card: ModelCard, settings: Settings, faces: int) -> ClusterParams:
    """Clustering thresholds from the card at the configured operating points, for
    ``faces`` faces clustered together."""
    link = operating_point(card, settings.people_link_point)
    average = operating_point(card, settings.people_average_point)
    thresholds = dict(card.thresholds or {})
    for point in (link, average):  # a card without calibration: its fallback threshold
        thresholds.setdefault(point, threshold_for(card, point).value)
    return params_from_card(thresholds, link, average, settings.people_neighbours, faces)


def _face_answer(face: dict[str, Any], settings: Settings) -> dict[str, Any]:
    excluded = gate(face["quality"], settings) if not face["clusterable"] else []
    return {**face, "excluded": excluded}


def known_photo(gallery: GalleryService, name: str, digest: str, settings: Settings):
    """The photo if the gallery holds it already (``None`` otherwise)."""
    found = people_store(gallery).get_photo(check_gallery(name), digest)
    if found is None:
        return None
    return PhotoResult(digest, False, [_face_answer(f, settings) for f in found["faces"]])


def add_photo(
    gallery: GalleryService,
    card: ModelCard,
    settings: Settings,
    name: str,
    model_id: str,
    digest: str,
    found: Faces,
) -> PhotoResult:
    """Store the faces ``found`` in photo ``digest`` (see the module docstring)."""
    name = check_gallery(name)
    described = found.describe()
    clusterable = [not gate(d["quality"], settings) for d in described]
    subjects: list[str | None] = [None] * len(described)
    if len(described):
        rule = threshold_for(card, operating_point(card, settings.people_assign_point))
        best: dict[str, tuple[float, int]] = {}
        for k, candidates in enumerate(gallery.search(name, found.embeddings, 1, model_id)):
            if not candidates or not clusterable[k]:
                continue
            top = candidates[0]
            if decide(top["similarity"], rule).match:
                held = best.get(top["subject_id"])
                if held is None or top["similarity"] > held[0]:
                    best[top["subject_id"]] = (float(top["similarity"]), k)
        for subject_id, (_, k) in best.items():  # one face of a photo per subject
            subjects[k] = subject_id
    faces = []
    for k, detail in enumerate(described):
        thumbnail = None
        if settings.people_thumbnails:
            ok, jpeg = cv2.imencode(
                ".jpg", found.crops[k], [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY]
            )
            thumbnail = jpeg.tobytes() if ok else None
        faces.append(
            NewPhotoFace(
                embedding=found.embeddings[k],
                box=list(detail["box"]),
                landmarks=[list(p) for p in detail["landmarks"]],
                quality=detail["quality"],
                clusterable=clusterable[k],
                thumbnail=thumbnail,
                subject_id=subjects[k],
            )
        )
    width, height = found.image_size
    photo, created, seq = people_store(gallery).add_photo(
        name, model_id, digest, width, height, faces
    )
    gallery.sync_to(seq)
    return PhotoResult(digest, created, [_face_answer(f, settings) for f in photo["faces"]])


def run_clustering(
    gallery: GalleryService,
    card: ModelCard,
    settings: Settings,
    name: str,
    model_id: str,
    *,
    max_faces: int | None = None,
) -> ClusterRun:
    """Cluster the gallery's faces (see the module docstring); ``max_faces``: refuse
    (``TooManyFaces``, nothing changed) a gallery with more faces taking part."""
    began = time.perf_counter()
    name = check_gallery(name)
    store = people_store(gallery)
    snapshot = store.people_faces(name)
    check_model(name, snapshot.model_id, model_id)
    assigned_alone = np.array([s is not None for s in snapshot.subject_ids], bool) & (
        snapshot.cluster_nos == 0
    )
    part = snapshot.clusterable & ~assigned_alone
    index = np.flatnonzero(part)
    if max_faces is not None and len(index) > max_faces:
        raise TooManyFaces(
            f"{len(index)} faces take part, more than one request clusters "
            f"({max_faces}, FACEGATE_PEOPLE_MAX_CLUSTER_FACES); run `facegate people cluster`"
        )
    params = cluster_params(card, settings, len(index))
    joins: dict[int, list[int]] = {}
    groups: list[list[int]] = []
    outliers = 0
    if len(index):
        _, photos = np.unique(
            np.array(snapshot.photo_ids, dtype=object)[index], return_inverse=True
        )
        fixed = np.where(snapshot.cluster_nos[index] > 0, snapshot.cluster_nos[index], -1)
        by_subject: dict[str, set[int]] = {}
        for cluster_no, named in snapshot.cluster_subjects.items():
            if named is not None:
                by_subject.setdefault(named, set()).add(cluster_no)
        position = {int(f): k for k, f in enumerate(snapshot.face_ids[index])}
        forbidden: list[set[int]] = [set() for _ in index]
        for face_id, banned_cluster, banned_subject in snapshot.cannot_link:
            at = position.get(face_id)
            if at is None:
                continue
            if banned_cluster is not None:
                forbidden[at].add(banned_cluster)
            if banned_subject is not None:
                forbidden[at] |= by_subject.get(banned_subject, set())
        labels = cluster(snapshot.embeddings[index], photos, params, fixed, forbidden)
        members: dict[int, list[int]] = {}
        for k, label in enumerate(labels):
            if label < 0:
                outliers += 1
            else:
                members.setdefault(int(label), []).append(k)
        for ks in members.values():
            holds = {int(fixed[k]) for k in ks if fixed[k] > 0}
            free = [int(snapshot.face_ids[index][k]) for k in ks if fixed[k] <= 0]
            if holds:
                if free:
                    joins.setdefault(holds.pop(), []).extend(free)
            elif len(free) > 1:
                groups.append(free)
    counts, seq = store.apply_clusters(name, joins, groups)
    gallery.sync_to(seq)
    total = _cluster_count(store, name)
    return ClusterRun(
        faces=len(index),
        clusters=total,
        clusters_created=int(counts["clusters_created"]),
        faces_joined=int(counts["faces_joined"]),
        outliers=outliers,
        seconds=time.perf_counter() - began,
        params=params.to_dict(),
    )


def _cluster_count(store: PeopleStore, name: str) -> int:
    count, after = 0, None
    while True:
        page, more = store.list_clusters(name, MAX_PAGE, after)
        count += len(page)
        if not more or not page:
            return count
        after = (page[-1]["size"], cluster_number(page[-1]["cluster_id"]))


def list_clusters(
    gallery: GalleryService, name: str, limit: int = 100, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of clusters, largest first, and the next page's cursor (or None)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be an integer from 1 to {MAX_PAGE}")
    name = check_gallery(name)
    after = None
    if cursor is not None:
        size, _, number = decode_cursor(name, cursor).partition(":")
        if not (size.isdigit() and number.isdigit()):
            raise InvalidInput("invalid pagination cursor")
        after = (int(size), int(number))
    page, more = people_store(gallery).list_clusters(name, limit, after)
    next_cursor = None
    if more and page:
        last = page[-1]
        next_cursor = encode_cursor(name, f"{last['size']}:{cluster_number(last['cluster_id'])}")
    return page, next_cursor


def get_cluster(gallery: GalleryService, name: str, cluster_id: str) -> dict[str, Any]:
    return people_store(gallery).get_cluster(check_gallery(name), cluster_number(cluster_id))


def _face_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInput("face_id must be a positive integer")
    return int(value)


def get_face(gallery: GalleryService, name: str, face_id: int) -> dict[str, Any]:
    return people_store(gallery).get_photo_face(check_gallery(name), _face_id(face_id))


def face_thumbnail(gallery: GalleryService, name: str, face_id: int) -> bytes | None:
    return people_store(gallery).face_thumbnail(check_gallery(name), _face_id(face_id))


def name_cluster(
    gallery: GalleryService,
    name: str,
    cluster_id: str,
    subject_id: str,
    metadata: dict[str, Any] | None,
    model_id: str,
) -> dict[str, Any]:
    """Link a cluster to a subject (created if absent); its faces become the subject's."""
    result, seq = people_store(gallery).name_cluster(
        check_gallery(name),
        cluster_number(cluster_id),
        check_subject_id(subject_id),
        metadata,
        model_id,
    )
    gallery.sync_to(seq)
    return result


def merge_clusters(
    gallery: GalleryService, name: str, cluster_id: str, source: str, model_id: str
) -> dict[str, Any]:
    result, seq = people_store(gallery).merge_clusters(
        check_gallery(name), cluster_number(cluster_id), cluster_number(source), model_id
    )
    gallery.sync_to(seq)
    return result


def move_face(
    gallery: GalleryService,
    name: str,
    face_id: int,
    model_id: str,
    cluster_id: str | None = None,
    subject_id: str | None = None,
) -> dict[str, Any]:
    result, seq = people_store(gallery).move_face(
        check_gallery(name),
        _face_id(face_id),
        model_id,
        None if cluster_id is None else cluster_number(cluster_id),
        None if subject_id is None else check_subject_id(subject_id),
    )
    gallery.sync_to(seq)
    return result


def remove_face(gallery: GalleryService, name: str, face_id: int) -> dict[str, Any]:
    result, seq = people_store(gallery).remove_face(check_gallery(name), _face_id(face_id))
    gallery.sync_to(seq)
    return result


def split_cluster(
    gallery: GalleryService, name: str, cluster_id: str, face_ids: list[int]
) -> dict[str, Any]:
    if not isinstance(face_ids, list) or not face_ids:
        raise InvalidInput("face_ids must be a non-empty list of face ids")
    result, seq = people_store(gallery).split_cluster(
        check_gallery(name), cluster_number(cluster_id), [_face_id(f) for f in face_ids]
    )
    gallery.sync_to(seq)
    return result


__all__ = ["cluster_name", "cluster_number"]
