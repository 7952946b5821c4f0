"""OpenAPI descriptions of the image-taking endpoints (their bodies are parsed by ``images.py``)."""

from __future__ import annotations

from pydantic import BaseModel

from .schemas import ErrorBody

#: Error statuses every image endpoint can answer, all with the same body.
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in [
        (400, "bad image, bad base64, bad option, unknown operating point, URL refused"),
        (401, "missing API key"),
        (403, "wrong API key"),
        (404, "unknown gallery, subject or face"),
        (408, "request body too slow"),
        (409, "gallery of another model, or conflicting write"),
        (413, "image or request too large, or its decode would take too much memory"),
        (415, "unsupported image or content type"),
        (422, "no face, several faces, low-quality face, invalid or missing field"),
        (503, "service not ready"),
    ]
}


def image_body(image_fields: tuple[str, ...], options: type[BaseModel] | None = None) -> dict:
    """``openapi_extra`` declaring a multipart body and an equivalent base64 JSON body."""
    option_props = {}
    if options is not None:
        option_props = options.model_json_schema().get("properties", {})
    option_props = {
        **{
            f"{name}_url": {
                "type": "string",
                "format": "uri",
                "description": f"instead of {name}: an http(s) URL of the image, "
                "fetched only from hosts on the server's "
                "FACEGATE_URL_ALLOWLIST",
            }
            for name in image_fields
        },
        **option_props,
    }
    multipart = {
        "type": "object",
        "properties": {
            **{name: {"type": "string", "format": "binary"} for name in image_fields},
            **option_props,
        },
    }
    as_json = {
        "type": "object",
        "properties": {
            **{
                name: {
                    "type": "string",
                    "format": "byte",
                    "description": "base64 image (JPEG, PNG, WebP or BMP)",
                }
                for name in image_fields
            },
            **option_props,
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": as_json},
            },
        }
    }
