"""``POST /v1/galleries/{g}/faces``: enrol many photos in one request.

The body is either JSON, ``{"items": [{"subject_id", "image" (base64) | "image_url",
"metadata"?}, ...]}``, or ``multipart/form-data`` with the items' parts in order: each
item starts with a ``subject_id`` part, followed by its ``image`` file (or ``image_url``)
and optionally a ``metadata`` part (a JSON object).  At most ``settings.bulk_max_items``
items (413 ``too_many_items``).

Every item is answered in order, with its ``face_id`` or an ``error`` object carrying the
usual codes (a bad image, no face, a subject id that is not valid, ...): one bad item does
not refuse the others.  The photos go through the enrolment pipeline together (located
concurrently in the worker threads, then **one** embedding call), and the accepted items
are committed **in one transaction** after every item was analysed: all of them or, if
the server dies first, none.  A photo the gallery already holds (same sha256) is not
enrolled again: its item answers with the existing ``face_id`` and ``created: false``, so
a client that lost the answer (a crash, a timeout) simply sends the same request again.  A
photo the gallery holds for *another* subject is refused with its own code,
``photo_enrolled_elsewhere``, naming neither that subject nor its face (an enrol-only key
learns nothing of who holds it), and a subject whose every item is refused is not created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.bulk import (
    Accepted,
    Located,
    embed_located,
    enrol_photos,
    locate_photo,
    merge_embedded,
)
from service.gallery.bulk import check_metadata
from service.gallery.errors import GalleryNotFound, InvalidInput, PhotoEnrolledElsewhere
from service.gallery.names import check_subject_id
from service.pipeline.errors import PipelineError
from service.pipeline.types import Timings

from . import analysis
from .audit import EnrolAudit
from .deps import State, require_api_key
from .errors import ApiError, bad_request, describe, unsupported_media_type
from .galleries import GalleryName
from .images import _fetch_urls, _read_upload, decode_base64, read_json_object
from .openapi import ERROR_RESPONSES
from .schemas import NAME_PATTERN
from .scopes import require_scope

router = APIRouter(
    prefix="/v1/galleries",
    tags=["galleries"],
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
)

_ITEM_KEYS = {"subject_id", "image", "image_url", "metadata"}


class BulkItemResult(BaseModel):
    index: int
    subject_id: Any = None
    face_id: int | None = None
    created: bool | None = Field(
        None,
        description="false: this photo was enrolled before (same sha256); face_id names that face",
    )
    quality: dict[str, Any] | None = None
    error: dict[str, str] | None = Field(None, description="{code, message} of a refused item")


class BulkResult(BaseModel):
    gallery: str
    model: str
    enrolled: int
    already_enrolled: int
    refused: int
    items: list[BulkItemResult]


@dataclass
class _Item:
    index: int
    subject_id: Any = None
    metadata: Any = None
    image: bytes | None = None
    image_url: Any = None
    error: tuple[str, str] | None = None  # (code, message)

    @property
    def photo(self) -> bytes:
        """The photo's bytes, once read or fetched (every item without an error has them)."""
        if self.image is None:
            raise RuntimeError(f"items[{self.index}]: no photo read")
        return self.image

    def refuse(self, exc: BaseException) -> None:
        if self.error is None:
            _, code, message = describe(exc)
            self.error = (code, message)


def _too_many(limit: int) -> ApiError:
    return ApiError(
        413,
        "too_many_items",
        f"a bulk request takes at most {limit} items (FACEGATE_BULK_MAX_ITEMS); "
        "split it into several requests",
    )


def _check_item(item: _Item) -> None:
    """Refuse an item (not the request) whose fields are wrong."""
    check_subject_id(item.subject_id, f"items[{item.index}].subject_id")
    if item.metadata is not None:
        check_metadata(item.metadata, f"items[{item.index}].metadata")
    if (item.image is None) == (item.image_url is None):
        raise InvalidInput(f"items[{item.index}]: give image or image_url (exactly one)")


async def _json_items(request: Request, limit: int, max_image_bytes: int) -> list[_Item]:
    data = await read_json_object(request)
    if set(data) != {"items"} or not isinstance(data["items"], list):
        raise ApiError(
            422,
            "validation_error",
            'the JSON body must be {"items": [{subject_id, image | image_url, metadata?}, ...]}',
        )
    if len(data["items"]) > limit:
        raise _too_many(limit)
    items = []
    for index, raw in enumerate(data["items"]):
        item = _Item(index)
        items.append(item)
        if not isinstance(raw, dict) or not set(raw) <= _ITEM_KEYS:
            item.refuse(
                InvalidInput(f"items[{index}] must be an object with the keys {sorted(_ITEM_KEYS)}")
            )
            continue
        item.subject_id, item.metadata = raw.get("subject_id"), raw.get("metadata")
        item.image_url = raw.get("image_url")
        try:
            if raw.get("image") is not None:
                if not isinstance(raw["image"], str):
                    raise bad_request("invalid_base64", f"items[{index}].image must be base64")
                item.image = decode_base64(f"items[{index}].image", raw["image"], max_image_bytes)
        except Exception as exc:  # every refusal is the item's answer
            item.refuse(exc)
    return items


async def _multipart_items(request: Request, limit: int, max_image_bytes: int) -> list[_Item]:
    try:
        form = await request.form(
            max_files=limit + 1, max_fields=3 * limit + 3, max_part_size=max_image_bytes * 2
        )
    except StarletteHTTPException as exc:
        raise bad_request("invalid_multipart", f"malformed multipart body: {exc.detail}") from None
    items: list[_Item] = []
    try:
        for key, value in form.multi_items():
            if key == "subject_id":
                if len(items) == limit:
                    raise _too_many(limit)
                items.append(_Item(len(items), subject_id=value))
                continue
            if key not in _ITEM_KEYS:
                raise bad_request("unexpected_field", f"field {key!r} is not an item field")
            if not items:
                raise bad_request(
                    "invalid_multipart", "each item must start with its subject_id part"
                )
            item = items[-1]
            try:
                if key == "image":
                    if isinstance(value, UploadFile):
                        item.image = await _read_upload(
                            f"items[{item.index}].image", value, max_image_bytes
                        )
                    else:
                        item.image = decode_base64(
                            f"items[{item.index}].image", value, max_image_bytes
                        )
                elif isinstance(value, UploadFile):
                    raise bad_request("unexpected_file", f"field {key!r} does not take a file")
                elif key == "image_url":
                    item.image_url = value
                else:
                    try:
                        item.metadata = json.loads(value)
                    except json.JSONDecodeError:
                        raise InvalidInput(f"items[{item.index}].metadata is not JSON") from None
            except ApiError as exc:
                if exc.code == "unexpected_file":
                    raise
                item.refuse(exc)
            except Exception as exc:  # the item's answer
                item.refuse(exc)
    finally:
        await form.close()
    return items


async def _fetch(request: Request, item: _Item, max_image_bytes: int, clock: Timings) -> None:
    try:
        images = await _fetch_urls(
            request, {"image": ("image_url", item.image_url)}, max_image_bytes, clock
        )
        item.image = images["image"]
    except Exception as exc:  # the item's answer
        item.refuse(exc)


async def _analyse(state, photos: list[bytes], clock: Timings) -> list:
    """Locate the photos' faces concurrently (each photo one worker-thread call, bounded like
    every image of the service), then embed all accepted faces in one model call."""
    found: list = [None] * len(photos)
    pipeline, settings = state.pipeline, state.settings

    async def locate(i: int) -> None:
        try:
            found[i] = await anyio.to_thread.run_sync(
                locate_photo, pipeline, settings, photos[i], limiter=state.cpu_limiter
            )
        except PipelineError as exc:
            found[i] = exc

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for i in range(len(photos)):
            group.start_soon(locate, i)
    clock.add("detect", time.perf_counter() - start)
    start = time.perf_counter()
    located = [item for item in found if isinstance(item, Located)]
    accepted = await anyio.to_thread.run_sync(
        embed_located, pipeline, located, limiter=state.cpu_limiter
    )
    clock.add("embed", time.perf_counter() - start)
    return merge_embedded(found, accepted)


_ITEM_SCHEMA = {
    "type": "object",
    "required": ["subject_id"],
    "properties": {
        "subject_id": {"type": "string", "pattern": NAME_PATTERN},
        "image": {"type": "string", "format": "byte", "description": "base64 image"},
        "image_url": {
            "type": "string",
            "format": "uri",
            "description": "instead of image (FACEGATE_URL_ALLOWLIST)",
        },
        "metadata": {"type": "object", "description": "for a subject created here"},
    },
}
BULK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["items"],
                    "properties": {
                        "items": {
                            "type": "array",
                            "items": _ITEM_SCHEMA,
                            "description": "at most FACEGATE_BULK_MAX_ITEMS",
                        }
                    },
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": "repeated parts in order; each item starts with subject_id, "
                    "then image (file) or image_url, and optionally metadata "
                    "(JSON text)",
                    "properties": {
                        "subject_id": {"type": "string"},
                        "image": {"type": "string", "format": "binary"},
                        "image_url": {"type": "string", "format": "uri"},
                        "metadata": {"type": "string"},
                    },
                }
            },
        },
    }
}


@router.post(
    "/{gallery}/faces",
    response_model=BulkResult,
    response_model_exclude_none=True,
    summary="Enrol many photos in one request (bulk)",
    dependencies=[require_scope("enrol")],
    openapi_extra=BULK_BODY,
)
async def bulk_enrol(
    gallery: GalleryName, request: Request, state: State, _audit: EnrolAudit
) -> dict:
    """Items ``{subject_id, image | image_url, metadata?}`` (JSON ``items`` list, or multipart
    parts in order, each item starting with ``subject_id``); subjects are created as needed
    (with ``metadata``; an existing subject is left unchanged).  Each item is answered with
    ``face_id`` (``created: false`` when the photo was enrolled before) or an ``error``.
    Accepted items are committed together in one transaction; nothing is written for a
    request the server did not finish.  413 ``too_many_items`` over
    ``FACEGATE_BULK_MAX_ITEMS``; 409 ``model_mismatch`` for another model's gallery."""
    settings = state.settings
    clock = Timings()
    limit, max_bytes = settings.bulk_max_items, settings.max_image_bytes
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        items = await _multipart_items(request, limit, max_bytes)
    elif content_type == "application/json" or content_type.endswith("+json"):
        items = await _json_items(request, limit, max_bytes)
    else:
        raise unsupported_media_type(
            f"content type {content_type or 'none'!r} is not accepted; send application/json "
            "with an items list or multipart/form-data with subject_id and image parts"
        )
    if not items:
        raise ApiError(422, "validation_error", "items: at least one item is required")
    # A gallery of another model is refused before any image work; an absent one is created.
    with contextlib.suppress(GalleryNotFound):
        await analysis.gallery_for_model(state, gallery, clock)
    for item in items:
        if item.error is None:
            try:
                _check_item(item)
            except InvalidInput as exc:
                item.refuse(exc)
    fetches = [
        _fetch(request, item, max_bytes, clock)
        for item in items
        if item.error is None and item.image_url is not None
    ]
    if fetches:
        await asyncio.gather(*fetches)
    todo = [item for item in items if item.error is None]
    results = await _analyse(state, [item.photo for item in todo], clock)
    accepted: list[tuple[_Item, Accepted]] = []
    for item, result in zip(todo, results, strict=True):
        if isinstance(result, Accepted):
            accepted.append((item, result))
        else:
            item.refuse(result)
    written: dict[int, dict] = {}
    if accepted:
        rows = await analysis.call(
            clock,
            "gallery",
            enrol_photos,
            state.gallery,
            gallery,
            state.model_id,
            [(item.subject_id, item.metadata, item.image) for item, _ in accepted],
            [face for _, face in accepted],
        )
        for (item, face), row in zip(accepted, rows, strict=True):
            if row.get("error"):  # enrolled under another subject: the item's own refusal
                item.refuse(PhotoEnrolledElsewhere(item.subject_id))
            else:
                written[item.index] = {**row, "quality": face.quality}
    answers = []
    for item in items:
        if item.error is not None:
            answers.append(
                {
                    "index": item.index,
                    "subject_id": item.subject_id,
                    "error": {"code": item.error[0], "message": item.error[1]},
                }
            )
        else:
            answers.append({"index": item.index, **written[item.index]})
    state.metrics.observe_stages(request.scope, clock.stages)
    created = sum(1 for row in written.values() if row["created"])
    return {
        "gallery": gallery,
        "model": state.model_id,
        "enrolled": created,
        "already_enrolled": len(written) - created,
        "refused": sum(1 for item in items if item.error is not None),
        "items": answers,
    }
