"""``facegate audit``: read the audit log on the configured store (no server needed).

Prints one JSON object per record, oldest first (the same fields as ``GET /v1/audit``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
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


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def run(args) -> int:
    from service.config import Settings
    from service.gallery.backends import open_store
    from service.usecases.audit import MAX_PAGE, audit_query, read_audit
    from service.usecases.errors import RequestRefused

    try:
        query = audit_query(
            gallery=args.gallery,
            subject_id=args.subject_id,
            action=args.action,
            since=_time(args.since),
            until=_time(args.until),
        )
    except (ValueError, RequestRefused) as exc:
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
        left = max(0, args.limit)
        while left:
            query = replace(query, limit=min(left, MAX_PAGE))
            page = read_audit(store=store, query=query)
            for record in page.records:
                print(json.dumps(record.to_dict(), ensure_ascii=False))
            left -= len(page.records)
            if not page.more or not page.records:
                break
            query = replace(query, after=page.records[-1].id)
    finally:
        store.close()
    return 0
