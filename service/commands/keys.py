"""``facegate keys add``: create a scoped API key in the keys file.

The new key is printed once, on stdout; the file (``--file`` or ``FACEGATE_API_KEYS_FILE``,
JSON, or YAML for ``.yaml`` / ``.yml``) only ever holds its hash.  Running servers read the
file when they start.  See :mod:`service.api.keys` for the format and the rules.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from service.files import atomic_write
from service.helptext import summary


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "keys", help="scoped API keys", description="Scoped API keys (FACEGATE_API_KEYS_FILE)."
    )
    actions = parser.add_subparsers(dest="action", required=True)
    p_add = actions.add_parser(
        "add",
        help="create a key; print it once, store its hash",
        description=summary(__doc__),
    )
    p_add.add_argument("--id", required=True, help="the key's id (shown in the audit log)")
    p_add.add_argument(
        "--scopes", required=True, help="comma-separated: verify, identify, enrol, delete, admin"
    )
    p_add.add_argument(
        "--galleries",
        default="*",
        help="comma-separated galleries the key may touch (default: *, all)",
    )
    p_add.add_argument(
        "--file", type=Path, default=None, help="keys file (default: FACEGATE_API_KEYS_FILE)"
    )
    p_add.set_defaults(func=run_add)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _write(path: Path, data: dict) -> None:
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text, mode=0o600)


def run_add(args) -> int:
    from service.api.keys import hash_key, new_key, parse_record, read_keys_file
    from service.config import Settings

    path = args.file or Settings().api_keys_file
    if path is None:
        print("error: no keys file: pass --file or set FACEGATE_API_KEYS_FILE", file=sys.stderr)
        return 2
    try:
        existing = read_keys_file(path) if path.exists() else []
        key = new_key()
        entry = {
            "id": args.id,
            "hash": hash_key(key),
            "scopes": _split(args.scopes),
            "galleries": _split(args.galleries),
        }
        parse_record(entry, "new key")
        if args.id in {k.id for k in existing}:
            raise ValueError(f"{path}: a key with id {args.id!r} exists already")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    records = [
        {"id": k.id, "hash": k.hash, "scopes": sorted(k.scopes), "galleries": sorted(k.galleries)}
        for k in existing
    ]
    _write(path, {"keys": [*records, entry]})
    print(
        f"key {args.id!r} added to {path}; it is shown only now, store it safely:", file=sys.stderr
    )
    print(key)
    return 0
