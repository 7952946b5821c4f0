"""The one rule for gallery names and subject ids, shared by the REST API, the CLI and the store.

A gallery name is 1-64 characters from ``A-Z a-z 0-9 _ . -``; a subject id is 1-128
characters from ``A-Z a-z 0-9 _ . : @ + -``.  Neither may be a dot-segment (``.`` or
``..``): a client or proxy that normalises URLs would turn
``/v1/galleries/g/subjects/..`` into ``/v1/galleries/g`` and act on another resource.
The patterns are exported for the OpenAPI schema; :func:`check_gallery` and
:func:`check_subject_id` are what every layer calls.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from .errors import InvalidInput

GALLERY_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
SUBJECT_PATTERN = r"^[A-Za-z0-9_.:@+\-]{1,128}$"
DOT_SEGMENTS = (".", "..")

_RULES = {
    "gallery": (re.compile(GALLERY_PATTERN), "1 to 64 characters from A-Z a-z 0-9 _ . -"),
    "subject_id": (re.compile(SUBJECT_PATTERN), "1 to 128 characters from A-Z a-z 0-9 _ . : @ + -"),
}


def _check(value: object, kind: str, what: str) -> str:
    pattern, allowed = _RULES[kind]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(f"{what} must be {allowed}")
    if value in DOT_SEGMENTS:
        raise InvalidInput(f"{what} must not be '.' or '..' (a URL dot-segment)")
    return value


def check_gallery(value: object, what: str = "gallery") -> str:
    """A valid gallery name, or :class:`InvalidInput` saying what a name may hold."""
    return _check(value, "gallery", what)


def check_subject_id(value: object, what: str = "subject_id") -> str:
    """A valid subject id, or :class:`InvalidInput` saying what an id may hold."""
    return _check(value, "subject_id", what)


#: Pydantic types (request bodies, path and query parameters) running the same checks.
GalleryNameStr = Annotated[str, AfterValidator(check_gallery)]
SubjectIdStr = Annotated[str, AfterValidator(check_subject_id)]
