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

import json
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.gallery.errors import InvalidInput
from service.pipeline.types import Timings
from service.usecases.enrol_many import BulkItem, enrol_many

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

    def frozen(self) -> BulkItem:
        return BulkItem(
            self.index, self.subject_id, self.metadata, self.image, self.image_url, self.error
        )

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


def _fetcher(request: Request, max_image_bytes: int, clock: Timings):
    """The use case's ``fetch``: an item's ``image_url`` through the allow-listed fetcher,
    or the item's refusal."""

    async def fetch(index: int, url: Any) -> bytes | tuple[str, str]:
        try:
            images = await _fetch_urls(
                request, {"image": ("image_url", url)}, max_image_bytes, clock
            )
            return images["image"]
        except Exception as exc:  # the item's answer
            _, code, message = describe(exc)
            return code, message

    return fetch


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
    result = await enrol_many(
        work=analysis.worker(state),
        settings=settings,
        gallery=state.gallery,
        name=gallery,
        items=[item.frozen() for item in items],
        timings=clock,
        fetch=_fetcher(request, max_bytes, clock),
    )
    state.metrics.observe_stages(request.scope, clock.stages)
    return result.to_dict()
