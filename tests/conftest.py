"""Shared fixtures: the read-only ``../shared`` tree (data and reference models)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import pytest

from tests.support.pg import postgres_cluster, postgres_url  # noqa: F401  (PostgreSQL fixtures)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared")).resolve()
SHARED_MODELS = SHARED / "models"
LFW = SHARED / "data" / "lfw"
CELEBA = SHARED / "data" / "celeba"
#: insightface's own group photo (several faces), shipped in its PyPI package: 128 KB
_INSIGHTFACE = importlib.util.find_spec("insightface")
assert _INSIGHTFACE is not None and _INSIGHTFACE.origin is not None  # a test dependency
GROUP_PHOTO = Path(_INSIGHTFACE.origin).parent / "data" / "images" / "t1.jpg"
#: Set to 1 to let tests whose reference library (dlib, torch: the dev and train extras)
#: is not installed skip; otherwise a missing reference fails them.
ALLOW_SKIP_REFERENCES = "FACEGATE_ALLOW_SKIP_REFERENCES"


def require_reference(module: str, why: str):
    """Import a reference library of the dev/train extras (``dlib``, ``torch``).

    Missing, the calling test (or test module) fails, since the suite is run with those
    extras installed; with ``FACEGATE_ALLOW_SKIP_REFERENCES=1`` it is skipped instead.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = (
            f"{module} is not importable ({exc}); it is {why}. Install the extras "
            "(pip install -e '.[dev,train]') or set FACEGATE_ALLOW_SKIP_REFERENCES=1 "
            "to skip the tests that need it"
        )
        if os.environ.get(ALLOW_SKIP_REFERENCES) == "1":
            pytest.skip(message, allow_module_level=True)
        pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def shared() -> Path:
    assert SHARED.is_dir(), f"../shared not found at {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def shared_registry():
    """A registry whose model directory is ``../shared/models``."""
    from service.config import MANIFEST_PATH
    from service.registry import Registry

    return Registry(MANIFEST_PATH, [SHARED_MODELS])


@pytest.fixture(scope="session")
def default_models_dir() -> Path:
    """The default models (``facegate models install``) in a cache shared across test runs."""
    from service.config import Settings
    from service.convert.install import install_defaults

    directory = Path.home() / ".cache" / "facegate" / "test-models"
    install_defaults(Settings(models_dir=directory))
    return directory


@pytest.fixture(scope="session", autouse=True)
def _no_proxy_for_localhost():
    """Tests talk only to 127.0.0.1: a proxy in the environment must not catch those calls
    (this process's nor the servers' it starts). Tests of proxy handling set their own."""
    with pytest.MonkeyPatch.context() as patch:
        for key in ("NO_PROXY", "no_proxy"):
            current = os.environ.get(key, "")
            patch.setenv(key, ",".join(filter(None, [current, "127.0.0.1", "localhost", "::1"])))
        yield


def pytest_terminal_summary(terminalreporter):
    """Print the figures tests recorded with ``record_property`` (accuracy and the like):
    pytest keeps a passing test's output to itself, so a figure only printed would not show."""
    lines = [
        f"{report.nodeid}: {name}: {value}"
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        if report.when == "call"
        for name, value in report.user_properties
    ]
    if lines:
        terminalreporter.section("recorded figures")
        for line in lines:
            terminalreporter.write_line(line)


def photo(name: str, number: int) -> bytes:
    """The ``number``-th LFW photo of ``name`` (1-based, in file-name order)."""
    return sorted((LFW / "images" / name).glob("*.jpg"))[number - 1].read_bytes()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A gallery store URL on each backend: a SQLite file, then the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'gallery.sqlite3'}"
    return request.getfixturevalue("postgres_url")
