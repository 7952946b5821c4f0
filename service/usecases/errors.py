"""A request a use case refuses: carries its HTTP ``status`` and machine ``code``.

Mapped to ``{"error": {"code", "message"}}`` by :mod:`service.api.errors` (as the
pipeline's and the gallery's typed errors are); the CLI prints the same pair.
"""

from __future__ import annotations


class RequestRefused(Exception):
    """The request's fields do not make a request this use case can answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def missing_field(message: str) -> RequestRefused:
    return RequestRefused(422, "missing_field", message)


def ambiguous(message: str) -> RequestRefused:
    return RequestRefused(400, "ambiguous_request", message)
