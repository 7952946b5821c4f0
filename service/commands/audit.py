"""``facegate audit``: read the audit log on the configured store (no server needed).

Prints one JSON object per record, oldest first (the same fields as ``GET /v1/audit``).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime

from service.helptext import summary


def register(subparsers) -> None:
    from .gallery_transfer import add_store_options

    parser = subparsers.add_parser("audit", help="read the audit log", description=summary(__doc__))
    parser.add_argument("--gallery", default=None)
    parser.add_argument("--subject-id", default=None)
    parser.add_argument("--action", default=None)
    parser.add_argument("--since", default=None, help="ISO 8601 time, inclusive")
    parser.add_argument("--until", default=None, help="ISO 8601 time, exclusive")
    parser.add_argument("--limit", type=int, default=1000, help="most records (default 1000)")
    add_store_options(parser)
    parser.set_defaults(func=run)


def _epoch(text: str | None) -> float | None:
    if text is None:
        return None
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"{text!r}: give a time zone (e.g. Z)")
    return value.timestamp()


def run(args) -> int:
    from service.config import Settings
    from service.gallery.backends import open_store

    try:
        since, until = _epoch(args.since), _epoch(args.until)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    overrides = {
        k: v
        for k, v in (("data_dir", args.data_dir), ("store_url", args.store_url))
        if v is not None
    }
    store = open_store(Settings(**overrides).resolved_store_url)
    try:
        store.migrate()
        after, left = 0, max(0, args.limit)
        while left:
            records, more = store.audit_records(
                gallery=args.gallery,
                subject_id=args.subject_id,
                action=args.action,
                since=since,
                until=until,
                after=after,
                limit=min(left, 1000),
            )
            for record in records:
                print(json.dumps(record.to_dict(), ensure_ascii=False))
            left -= len(records)
            if not more or not records:
                break
            after = records[-1].id
    finally:
        store.close()
    return 0
