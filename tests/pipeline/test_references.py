"""``require_reference``: a parity test's missing reference library fails unless skips are
allowed."""

from __future__ import annotations

import pytest

from tests.conftest import ALLOW_SKIP_REFERENCES, require_reference

MISSING = "facegate_reference_that_is_not_installed"


def test_installed_references_are_imported():
    assert require_reference("dlib", "the parity reference").__name__ == "dlib"
    assert require_reference("torch", "the training framework").__name__ == "torch"


def test_a_missing_reference_fails_the_test(monkeypatch):
    monkeypatch.delenv(ALLOW_SKIP_REFERENCES, raising=False)
    with pytest.raises(pytest.fail.Exception) as info:
        require_reference(MISSING, "the parity reference")
    message = str(info.value)
    assert MISSING in message and "the parity reference" in message
    assert "FACEGATE_ALLOW_SKIP_REFERENCES=1" in message and ".[dev,train]" in message


def test_a_missing_reference_skips_only_when_allowed(monkeypatch):
    monkeypatch.setenv(ALLOW_SKIP_REFERENCES, "1")
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        require_reference(MISSING, "the parity reference")
    monkeypatch.setenv(ALLOW_SKIP_REFERENCES, "0")
    with pytest.raises(pytest.fail.Exception):
        require_reference(MISSING, "the parity reference")
