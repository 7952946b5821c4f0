"""Command-line help from docstrings: the reST markup a terminal would show raw, removed."""

from __future__ import annotations

import re

#: ``literal``, :role:`target` and :role:`text <target>`.
_LITERAL = re.compile(r"``(.+?)``")
_ROLE = re.compile(r":[a-z:]+:`([^`]+)`")


def _role(match: re.Match[str]) -> str:
    content = match.group(1)
    if "<" in content:  # :role:`text <target>`: the text
        return content.split("<", 1)[0].strip()
    if content.startswith("~"):  # :role:`~a.b.C`: C
        return content[1:].rsplit(".", 1)[-1]
    return content


def plain(text: str) -> str:
    """``text`` with reST literals and roles reduced to their words."""
    return _ROLE.sub(_role, _LITERAL.sub(r"\1", text))


def summary(doc: str | None) -> str:
    """The first paragraph of a module docstring, on one line, as plain text (an argparse
    description)."""
    first = (doc or "").strip().split("\n\n", 1)[0]
    return plain(" ".join(line.strip() for line in first.splitlines()))
