"""The configuration reference (``docs/configuration.md``) is the settings' own: generated
from ``service.config.Settings``, so a setting added, changed or described anew without
regenerating the page (``facegate config --markdown --write``) fails here."""

from __future__ import annotations

import json

from service.cli import main
from service.config import Settings
from service.config_reference import DOC_PATH, reference_markdown
from tests.conftest import REPO


def test_committed_reference_matches_the_settings():
    assert DOC_PATH.read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run `facegate config --markdown --write`"
    )


def test_every_setting_is_documented_once():
    text = reference_markdown()
    for name, info in Settings.model_fields.items():
        assert info.description, f"{name} has no description"
        assert text.count(f"| `FACEGATE_{name.upper()}` |") == 1
    assert "docs/configuration.md" in (REPO / "README.md").read_text()


def test_the_command_prints_the_reference_and_masks_secrets(capsys, monkeypatch):
    assert main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == reference_markdown()
    monkeypatch.setenv("FACEGATE_API_KEYS", "k1,k2")
    monkeypatch.setenv("FACEGATE_TOP_K_MAX", "7")
    assert main(["config"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert values["api_keys"] == "***" and values["top_k_max"] == 7
