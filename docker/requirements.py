"""Print the project's requirements from ``pyproject.toml``, one per line.

The images install these in a layer of their own before copying the source, so
that editing code does not reinstall every dependency:

    python docker/requirements.py pyproject.toml postgres > requirements.txt

Arguments after the path name optional-dependency groups (extras) to include.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    """The base dependencies followed by those of each named extra."""
    with open(pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [name for name in extras if name not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; known: {sorted(optional)}")
    lines = list(project.get("dependencies", []))
    for name in extras:
        lines.extend(optional[name])
    return lines


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
