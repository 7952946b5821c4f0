"""Limits of the JSON the store keeps (subject metadata, face quality), checked before
any write."""

from __future__ import annotations

import json

from service.gallery.errors import InvalidMetadata

#: Limits of stored JSON (subject metadata, face quality), checked before any write,
#: for create and update alike, so that whatever is stored can be read back.
MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 16


def json_depth(value: object) -> int:
    """Nesting depth of a JSON value (a scalar is 0, ``{}`` is 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values()
            if isinstance(item, dict)
            else item
            if isinstance(item, list | tuple)
            else None
        )
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def dump_json(value: object, what: str) -> str:
    """A JSON object as text, refusing anything that could not be read back as it was:
    not an object, too deep, too large, not serialisable, or not valid Unicode."""
    if not isinstance(value, dict):
        raise InvalidMetadata(f"{what} must be a JSON object")
    if json_depth(value) > MAX_JSON_DEPTH:
        raise InvalidMetadata(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidMetadata(
            f"{what} holds text that is not valid Unicode (a lone surrogate such as \\ud800)"
        ) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidMetadata(f"{what} is not JSON-serialisable: {exc}") from None
    if size > MAX_JSON_BYTES:
        raise InvalidMetadata(f"{what} is larger than {MAX_JSON_BYTES} bytes")
    return text
