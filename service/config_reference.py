"""The configuration reference, generated from :class:`service.config.Settings`.

``facegate config --markdown`` prints it and ``facegate config --markdown --write`` writes it
to ``docs/configuration.md``; ``tests/test_config_reference.py`` fails when the committed
file and the settings disagree.  Each row comes from one field: its environment variable,
its default (or the field's ``default_text``), its value in the Docker images
(``in_images``) and its description.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from service.config import REPO_ROOT, Settings

DOC_PATH = REPO_ROOT / "docs" / "configuration.md"

HEADER = """\
# Configuration

Every setting is an environment variable (read once per process by `service/config.py`);
there is no configuration file. Defaults below are those of `facegate serve` from a
checkout; the images set the values in the third column.

This page is generated from the settings' own descriptions: `facegate config --markdown`
prints it, `facegate config --markdown --write` rewrites it after a change to
`service/config.py` (a test fails while the two disagree).

| variable | default | in the images | meaning |
|---|---|---|---|
"""


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Path):
        try:
            return str(value.relative_to(REPO_ROOT))
        except ValueError:
            return str(value)
    if isinstance(value, list | tuple):
        return ",".join(_value(v) for v in value)
    return str(value)


def default_text(info: FieldInfo) -> str:
    """The default as the reference shows it."""
    shown = _extra(info).get("default_text")
    if shown is not None:
        return str(shown)
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "(required)"
    else:
        value = info.default
    if value is None:
        return "(unset)"
    text = _value(value)
    return f"`{text}`" if text else "(empty)"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference_markdown() -> str:
    """The whole of ``docs/configuration.md``."""
    prefix = Settings.model_config.get("env_prefix", "")
    rows = []
    for name, info in Settings.model_fields.items():
        images = _extra(info).get("in_images", "")
        rows.append(
            f"| `{prefix}{name.upper()}` | {_cell(default_text(info))} | {_cell(str(images))} "
            f"| {_cell(info.description or '')} |"
        )
    return HEADER + "\n".join(rows) + "\n"
