"""Reading a request's images and options from multipart form data or base64 JSON.

Endpoints that take images accept either

* ``multipart/form-data``: image files in the named fields (a text field holding
  base64 is accepted too), options as further text fields; or
* ``application/json``: an object whose image fields are base64 strings (a
  ``data:image/...;base64,`` prefix is allowed) and whose other keys are options.

Options may also be given in the query string; the body wins on a clash.  Every
image is size-checked before it is decoded (``settings.max_image_bytes``); the
whole body is bounded by the request-size middleware in ``service.app``.

An image field ``X`` may instead be given as a URL in the text field / JSON key
``X_url`` (``image_url``, ``image1_url``, ...); such URLs are fetched only from the
hosts of ``settings.url_allowlist`` (see ``service.api.urls``), size-bounded the same way.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.pipeline.errors import EmptyImage, ImageTooLarge

from .errors import ApiError, bad_request, unsupported_media_type
from .urls import UrlFetcher, fetch_all, url_field

OptionsT = TypeVar("OptionsT", bound=BaseModel)

_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
#: Query parameters that steer the response rather than the request's options.
RESPONSE_FLAGS = {"timings"}


@dataclass
class Payload:
    """The images (raw bytes, by field name) and the remaining option fields of a request."""

    images: dict[str, bytes] = field(default_factory=dict)
    fields: dict[str, object] = field(default_factory=dict)

    def options(self, model: type[OptionsT]) -> OptionsT:
        """Validate the option fields with ``model``; errors become a 422 ``validation_error``."""
        try:
            return model.model_validate(self.fields)
        except ValidationError as exc:
            parts = []
            for err in exc.errors()[:10]:
                loc = ".".join(str(p) for p in err.get("loc", ())) or "request"
                parts.append(f"{loc}: {err.get('msg', 'invalid')}")
            raise ApiError(422, "validation_error", "; ".join(parts)) from None


def decode_base64(name: str, text: str, max_bytes: int) -> bytes:
    """Strict base64 (standard or URL-safe alphabet) -> bytes, size-checked before decoding."""
    text = _WHITESPACE.sub("", _DATA_URL.sub("", text.strip(), count=1))
    if not text:
        raise EmptyImage(f"field {name!r} is empty")
    if len(text) * 3 // 4 > max_bytes + 2:
        raise ImageTooLarge(f"field {name!r} decodes to more than {max_bytes} bytes")
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("invalid_base64", f"field {name!r} is not valid base64") from None


async def _read_upload(name: str, upload: UploadFile, max_bytes: int) -> bytes:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"field {name!r} is larger than the limit of {max_bytes} bytes")
    return data


async def _fetch_urls(
    request: Request, urls: dict, max_image_bytes: int, timings
) -> dict[str, bytes]:
    """Fetch with the app's shared fetcher (built by the lifespan), or one for this request."""
    shared = getattr(getattr(request.app.state, "facegate", None), "fetcher", None)
    fetcher = shared or UrlFetcher.from_settings(request.app.state.settings)
    try:
        return await fetch_all(fetcher, urls, max_image_bytes, timings)
    finally:
        if fetcher is not shared:
            await fetcher.aclose()


async def read_json_object(request: Request) -> dict:
    """The request's JSON body as an object; 400 ``invalid_json`` for anything else
    (malformed, not UTF-8, nested too deeply for the parser, not an object)."""
    body = await request.body()
    try:
        data = json.loads(body) if body else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request("invalid_json", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("invalid_json", "the JSON body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("invalid_json", "the JSON body must be an object")
    return data


async def read_payload(
    request: Request,
    image_fields: tuple[str, ...],
    required: tuple[str, ...],
    max_image_bytes: int,
    timings=None,
) -> Payload:
    """Parse the request body into images and options (see the module docstring).

    Images given by URL are fetched last (concurrently), their time added to ``timings``
    as the ``fetch`` stage.
    """
    payload = Payload()
    payload.fields.update(
        {k: v for k, v in request.query_params.items() if k not in RESPONSE_FLAGS}
    )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form(
                max_files=len(image_fields) + 2, max_fields=64, max_part_size=max_image_bytes * 2
            )
        except StarletteHTTPException as exc:
            raise bad_request(
                "invalid_multipart", f"malformed multipart body: {exc.detail}"
            ) from None
        try:
            for key in form:
                values = form.getlist(key)
                if len(values) > 1:
                    raise bad_request("duplicate_field", f"field {key!r} is given more than once")
                value = values[0]
                if key in image_fields:
                    if isinstance(value, UploadFile):
                        payload.images[key] = await _read_upload(key, value, max_image_bytes)
                    else:
                        payload.images[key] = decode_base64(key, value, max_image_bytes)
                elif isinstance(value, UploadFile):
                    raise bad_request("unexpected_file", f"field {key!r} does not take a file")
                else:
                    payload.fields[key] = value
        finally:
            await form.close()
    elif content_type == "application/json" or content_type.endswith("+json"):
        data = await read_json_object(request)
        for key, value in data.items():
            if key in image_fields:
                if not isinstance(value, str):
                    raise bad_request("invalid_base64", f"field {key!r} must be a base64 string")
                payload.images[key] = decode_base64(key, value, max_image_bytes)
            else:
                payload.fields[key] = value
    else:
        raise unsupported_media_type(
            f"content type {content_type or 'none'!r} is not accepted; send multipart/form-data "
            "with image files or application/json with base64 images"
        )
    urls = {}
    for name in image_fields:
        key = url_field(name)
        if key in payload.fields:
            if name in payload.images:
                raise bad_request("ambiguous_request", f"give {name} or {key}, not both")
            urls[name] = (key, payload.fields.pop(key))
    missing = [name for name in required if name not in payload.images and name not in urls]
    if missing:
        raise ApiError(422, "missing_field", "missing image field(s): " + ", ".join(missing))
    if urls:
        payload.images.update(await _fetch_urls(request, urls, max_image_bytes, timings))
    return payload
