"""People discovery over HTTP: photos in, clusters out, corrections by hand.

Thin routes over :mod:`service.usecases.people` (the logic and the rules live there):

* ``POST /v1/galleries/{g}/photos``: every face of a photo (201; 200 when the gallery
  already holds the photo: same sha256, same answer);
* ``POST /v1/galleries/{g}/clusters/run`` and ``GET /v1/galleries/{g}/clusters``;
* corrections: ``POST .../clusters/{c}/name``, ``.../merge``, ``.../split``,
  ``POST .../photo-faces/{f}/move`` and ``.../remove``.

Each route needs the scope of its kind (``enrol`` to change, ``identify`` to read) and a
key that may touch ``{g}``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from service.gallery.errors import FaceNotFound
from service.pipeline.types import Timings
from service.usecases import people

from . import analysis
from .audit import audited
from .deps import State, require_api_key
from .galleries import GalleryName
from .images import read_payload
from .openapi import ERROR_RESPONSES, image_body
from .scopes import require_scope

router = APIRouter(
    prefix="/v1/galleries",
    tags=["people"],
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
)

ClusterId = Annotated[str, Path(max_length=24, description="a cluster id such as c12")]
FaceId = Annotated[int, Path(ge=1, description="a photo face id")]


def _audit(action: str):
    return Depends(audited(action))


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NameBody(_Body):
    subject_id: str = Field(min_length=1, max_length=128)
    metadata: dict[str, Any] | None = None


class MergeBody(_Body):
    source: str = Field(max_length=24, description="the cluster merged into this one")


class SplitBody(_Body):
    face_ids: list[int] = Field(min_length=1, max_length=10_000)


class MoveBody(_Body):
    cluster_id: str | None = Field(None, max_length=24)
    subject_id: str | None = Field(None, min_length=1, max_length=128)


class PhotoFace(BaseModel):
    face_id: int
    photo_id: str
    box: list[float]
    landmarks: list[list[float]]
    quality: dict[str, Any]
    clusterable: bool
    excluded: list[str] = Field(
        default_factory=list, description="why the face is left out of clustering"
    )
    cluster_id: str | None
    subject_id: str | None
    assignment: str | None = Field(None, description="automatic or manual")
    enrolled_face_id: int | None = Field(
        None, description="the subject's enrolled face (what /v1/identify returns) while assigned"
    )


class Photo(BaseModel):
    photo_id: str
    created: bool
    faces: list[PhotoFace]


class Cluster(BaseModel):
    cluster_id: str
    face_ids: list[int]
    size: int
    subject_id: str | None
    origin: str = Field(description="automatic, or manual once a person changed it")
    representative_face_id: int | None


class ClusterPage(BaseModel):
    clusters: list[Cluster]
    next_cursor: str | None


class ClusterRunReport(BaseModel):
    faces: int
    clusters: int
    clusters_created: int
    faces_joined: int
    outliers: int
    seconds: float
    params: dict[str, Any]


async def _call(fn, *args):
    return await analysis.call(Timings(), "gallery", fn, *args)


@router.post(
    "/{gallery}/photos",
    response_model=Photo,
    status_code=201,
    openapi_extra=image_body(("image",)),
    summary="Add a photo: store every face in it (201; 200 when already added)",
    dependencies=[require_scope("enrol"), _audit("add_photo")],
)
async def add_photo(
    gallery: GalleryName, request: Request, response: Response, state: State
) -> dict:
    """Every face (largest first) is stored as a face of the gallery that belongs to no
    subject yet, with its box, landmarks and quality; the photo's id is the sha256 of its
    bytes, so posting it again adds nothing and answers the same.  A face under the
    clustering gate (``people_min_face_size``, ``people_min_det_score``,
    ``people_min_sharpness``) is kept but left out of clustering (``excluded`` says why).
    A face whose best subject clears ``people_assign_point`` (default ``fmr_1e-4``) is
    assigned to it (``assignment: automatic``) and is searchable by ``/v1/identify``."""
    settings = state.settings
    clock = Timings()
    payload = await read_payload(
        request, ("image",), ("image",), settings.max_image_bytes, timings=clock
    )
    payload.options(_NoOptions)
    data = payload.images["image"]
    digest = people.photo_id(data)
    await analysis.gallery_for_model(state, gallery, clock)
    known = await _call(people.known_photo, state.gallery, gallery, digest, settings)
    if known is None:
        found = await analysis.analyze(
            state, data, "all", clock, allow_none=True, limit=settings.max_faces
        )
        known = await _call(
            people.add_photo,
            state.gallery,
            state.pipeline.recognizer_card,
            settings,
            gallery,
            state.model_id,
            digest,
            found,
        )
    if not known.created:
        response.status_code = status.HTTP_200_OK
    return known.to_dict()


@router.post(
    "/{gallery}/clusters/run",
    response_model=ClusterRunReport,
    summary="Group the gallery's unassigned faces into clusters",
    dependencies=[require_scope("enrol"), _audit("cluster")],
)
async def run_clusters(gallery: GalleryName, state: State) -> dict:
    """Answers when done.  Clusters people named, merged or corrected keep their faces;
    new faces join existing clusters where they belong; two faces of one photo are never
    in one cluster and a face taken out of a cluster never goes back.  More than
    ``people_max_cluster_faces`` faces: 413 ``too_many_faces`` (use the CLI)."""
    run = await _call(
        lambda: people.run_clustering(
            state.gallery,
            state.pipeline.recognizer_card,
            state.settings,
            gallery,
            state.model_id,
            max_faces=state.settings.people_max_cluster_faces,
        )
    )
    return run.to_dict()


@router.get(
    "/{gallery}/clusters",
    response_model=ClusterPage,
    summary="Clusters, largest first (paginated)",
    dependencies=[require_scope("identify")],
)
async def list_clusters(
    gallery: GalleryName,
    state: State,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> dict:
    """A face in no cluster (an outlier) is not listed."""
    clusters, next_cursor = await _call(people.list_clusters, state.gallery, gallery, limit, cursor)
    return {"clusters": clusters, "next_cursor": next_cursor}


@router.get(
    "/{gallery}/clusters/{cluster_id}",
    response_model=Cluster,
    summary="One cluster",
    dependencies=[require_scope("identify")],
)
async def get_cluster(gallery: GalleryName, cluster_id: ClusterId, state: State) -> dict:
    return await _call(people.get_cluster, state.gallery, gallery, cluster_id)


@router.post(
    "/{gallery}/clusters/{cluster_id}/name",
    response_model=Cluster,
    summary="Name a cluster: its faces become a subject's (created if absent)",
    dependencies=[require_scope("enrol"), _audit("name_cluster")],
)
async def name_cluster(
    gallery: GalleryName, cluster_id: ClusterId, body: NameBody, state: State
) -> dict:
    """The faces become enrolled faces of ``subject_id`` (searchable by identify and
    verify).  A subject another cluster already names takes this cluster in.  409
    ``conflict`` when the subject holds another face of one of the cluster's photos."""
    return await _call(
        people.name_cluster,
        state.gallery,
        gallery,
        cluster_id,
        body.subject_id,
        body.metadata,
        state.model_id,
    )


@router.post(
    "/{gallery}/clusters/{cluster_id}/merge",
    response_model=Cluster,
    summary="Merge another cluster into this one",
    dependencies=[require_scope("enrol"), _audit("merge_clusters")],
)
async def merge_clusters(
    gallery: GalleryName, cluster_id: ClusterId, body: MergeBody, state: State
) -> dict:
    """422 ``invalid_input`` for a merge with itself; 409 ``conflict`` when the two are
    named for different subjects or hold faces of one photo."""
    return await _call(
        people.merge_clusters, state.gallery, gallery, cluster_id, body.source, state.model_id
    )


@router.post(
    "/{gallery}/clusters/{cluster_id}/split",
    response_model=Cluster,
    summary="Split faces off a cluster into a new one",
    dependencies=[require_scope("enrol"), _audit("split_cluster")],
)
async def split_cluster(
    gallery: GalleryName, cluster_id: ClusterId, body: SplitBody, state: State
) -> dict:
    """The faces leave the cluster (and its subject) for good: answers the new cluster."""
    return await _call(people.split_cluster, state.gallery, gallery, cluster_id, body.face_ids)


@router.get(
    "/{gallery}/photo-faces/{face_id}",
    response_model=PhotoFace,
    summary="One photo face",
    dependencies=[require_scope("identify")],
)
async def get_face(gallery: GalleryName, face_id: FaceId, state: State) -> dict:
    return await _call(people.get_face, state.gallery, gallery, face_id)


@router.get(
    "/{gallery}/photo-faces/{face_id}/thumbnail",
    summary="A photo face's thumbnail (JPEG; needs FACEGATE_PEOPLE_THUMBNAILS)",
    response_class=Response,
    dependencies=[require_scope("identify")],
)
async def face_thumbnail(gallery: GalleryName, face_id: FaceId, state: State) -> Response:
    data = await _call(people.face_thumbnail, state.gallery, gallery, face_id)
    if data is None:
        raise FaceNotFound(f"face {face_id} has no thumbnail (FACEGATE_PEOPLE_THUMBNAILS)")
    return Response(data, media_type="image/jpeg")


@router.post(
    "/{gallery}/photo-faces/{face_id}/move",
    response_model=PhotoFace,
    summary="Move a face to another cluster or subject",
    dependencies=[require_scope("enrol"), _audit("move_face")],
)
async def move_face(gallery: GalleryName, face_id: FaceId, body: MoveBody, state: State) -> dict:
    """Give ``cluster_id`` or ``subject_id``.  The face never goes back to the cluster or
    subject it left automatically."""
    return await _call(
        lambda: people.move_face(
            state.gallery, gallery, face_id, state.model_id, body.cluster_id, body.subject_id
        )
    )


@router.post(
    "/{gallery}/photo-faces/{face_id}/remove",
    response_model=PhotoFace,
    summary='Take a face out of its cluster and subject ("not this person")',
    dependencies=[require_scope("enrol"), _audit("remove_face")],
)
async def remove_face(gallery: GalleryName, face_id: FaceId, state: State) -> dict:
    """The rule sticks: no rerun puts the face back there."""
    return await _call(people.remove_face, state.gallery, gallery, face_id)
