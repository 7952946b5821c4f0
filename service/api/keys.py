"""API keys: who is calling (authentication) and what it may do (scopes, galleries).

Keys come from two places, both read once per app:

* ``FACEGATE_API_KEYS``: comma-separated keys with full access (ids ``key-1``, ``key-2``, ...
  in the audit log), as before scopes existed;
* ``FACEGATE_API_KEYS_FILE``: a JSON or YAML file ``{"keys": [{"id", "hash", "scopes",
  "galleries"}]}`` holding, per key, only the key's hash (``sha256:<hex>``, written by
  ``facegate keys add``, which prints the key itself once), its scopes (:data:`SCOPES`) and
  the galleries it may touch (``"*"``: all; else names under the gallery name rule of
  :mod:`service.gallery.names`).  Its id may not be one the service writes in the audit
  log itself (:data:`RESERVED_IDS`, ``key-N``).

No key configured at all: the service is open (every request is allowed, as ``anonymous``).

:func:`authenticate` finds the caller's key (compared in constant time with every
configured key; 401 without a key, 403 with a wrong one) and :func:`authorise` is the pure
rule: (key, the route's scope, the gallery it touches) -> allowed, or 403 naming the
missing scope or gallery.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from service.gallery.errors import InvalidInput
from service.gallery.names import check_gallery

from .errors import ApiError, forbidden, unauthorized

SCOPES = ("verify", "identify", "enrol", "delete", "admin")
ALL_GALLERIES = "*"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_ID = re.compile(r"^[A-Za-z0-9_.:@+\-]{1,64}$")
#: Key ids the service itself writes in the audit log: ``FACEGATE_API_KEYS``' keys
#: (``key-1``, ...), the CLI, callers without a key and callers with an unknown key.
RESERVED_IDS = ("cli", "anonymous", "invalid_key")
_RESERVED_ID = re.compile(r"^key-[0-9]+$")


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its id, the sha256 of the key, scopes and galleries."""

    id: str
    hash: str
    scopes: frozenset[str] = frozenset(SCOPES)
    galleries: frozenset[str] = frozenset({ALL_GALLERIES})

    def may_touch(self, gallery: str) -> bool:
        return ALL_GALLERIES in self.galleries or gallery in self.galleries


@dataclass(frozen=True)
class Keyring:
    """Every configured key; empty: the service is open."""

    keys: tuple[ApiKey, ...] = field(default_factory=tuple)

    @property
    def open(self) -> bool:
        return not self.keys


def hash_key(key: str) -> str:
    """The stored form of a key: ``sha256:<hex>`` of its UTF-8 bytes (keys are random, long
    secrets made by :func:`new_key`, so a fast hash is enough)."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe)."""
    return "fg_" + secrets.token_urlsafe(32)


def parse_record(entry: object, where: str) -> ApiKey:
    """One ``keys`` entry of a keys file, checked (``ValueError`` names what is wrong)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: each key must be an object")
    unknown = set(entry) - {"id", "hash", "scopes", "galleries"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    key_id, digest = entry.get("id"), entry.get("hash")
    if not isinstance(key_id, str) or not _ID.match(key_id):
        raise ValueError(f"{where}: id must be 1-64 characters of [A-Za-z0-9_.:@+-]")
    if key_id in RESERVED_IDS or _RESERVED_ID.match(key_id):
        raise ValueError(
            f"{where}: id {key_id!r} is reserved (the audit log's ids for FACEGATE_API_KEYS "
            f"keys, key-1, key-2, ..., and {', '.join(RESERVED_IDS)}); choose another"
        )
    if not isinstance(digest, str) or not _HASH.match(digest):
        raise ValueError(
            f"{where} ({key_id}): hash must be 'sha256:' and 64 hex digits "
            "(the key's hash, never the key; see `facegate keys add`)"
        )
    scopes, galleries = entry.get("scopes"), entry.get("galleries")
    if not isinstance(scopes, list) or not scopes or any(scope not in SCOPES for scope in scopes):
        raise ValueError(f"{where} ({key_id}): scopes must be a non-empty list of {SCOPES}")
    if (
        not isinstance(galleries, list)
        or not galleries
        or not all(isinstance(g, str) and g for g in galleries)
    ):
        raise ValueError(
            f"{where} ({key_id}): galleries must be a non-empty list of gallery names or '*'"
        )
    for name in galleries:
        if name != ALL_GALLERIES:
            try:
                check_gallery(name, f"{where} ({key_id}): gallery {name[:70]!r}")
            except InvalidInput as exc:
                raise ValueError(exc.message) from None
    return ApiKey(key_id, digest, frozenset(scopes), frozenset(galleries))


def read_keys_file(path: Path) -> list[ApiKey]:
    """The keys of a JSON or (``.yaml`` / ``.yml``) YAML keys file."""
    text = Path(path).read_text()
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{path}: a YAML keys file needs PyYAML (pip install PyYAML); "
                "or write the file as JSON"
            ) from None
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{path}: expected an object with a 'keys' list")
    keys = [parse_record(entry, f"{path}: keys[{i}]") for i, entry in enumerate(data["keys"])]
    ids = [key.id for key in keys]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: key ids must be unique")
    return keys


def build_keyring(flat_keys: list[str], keys_file: Path | None) -> Keyring:
    """The keys of ``FACEGATE_API_KEYS`` (full access) and ``FACEGATE_API_KEYS_FILE``."""
    keys = [ApiKey(f"key-{i}", hash_key(key)) for i, key in enumerate(flat_keys, start=1)]
    if keys_file is not None:
        keys += read_keys_file(keys_file)
    return Keyring(tuple(keys))


def authenticate(keyring: Keyring, given: str | None) -> ApiKey | None:
    """The caller's key (``None`` when the service is open); 401 without a key, 403 with one
    that is not configured.  The given key's hash is compared with every configured hash,
    each in constant time, so timing reveals neither whether nor which key matched."""
    if keyring.open:
        return None
    if not given:
        raise unauthorized()
    digest = hash_key(given).encode()
    found = None
    for key in keyring.keys:
        if hmac.compare_digest(digest, key.hash.encode()) and found is None:
            found = key
    if found is None:
        raise forbidden()
    return found


def authorise(key: ApiKey | None, scope: str | None, gallery: str | None = None) -> None:
    """Allow, or 403 naming what ``key`` lacks: ``scope`` (``None``: any valid key) and
    ``gallery`` (``None``: the route touches no gallery).  ``key=None``: open service."""
    if key is None:
        return
    if scope is not None and scope not in key.scopes and "admin" not in key.scopes:
        raise ApiError(
            403,
            "forbidden",
            f"API key {key.id!r} lacks the {scope!r} scope "
            f"(it has: {', '.join(sorted(key.scopes))})",
        )
    if gallery is not None and not key.may_touch(gallery):
        raise ApiError(
            403,
            "forbidden",
            # the gallery is not echoed: a refusal repeats nothing of another gallery
            f"API key {key.id!r} may not touch the gallery this request names",
            gallery=gallery,
        )
