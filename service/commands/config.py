"""``facegate config``: the settings in effect, or the configuration reference.

Without options: the settings this process would run with (``FACEGATE_*`` variables and
defaults) as JSON, the secrets (``api_keys``, ``metrics_key``) masked.  ``--markdown``:
the configuration reference generated from the settings' descriptions (``docs/configuration.md``),
printed, or with ``--write`` written there (``--output FILE``: elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

from service.helptext import summary

SECRETS = ("api_keys", "metrics_key")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "config",
        help="settings in effect, or the reference (--markdown)",
        description=summary(__doc__),
    )
    parser.add_argument(
        "--markdown", action="store_true", help="the configuration reference (Markdown)"
    )
    parser.add_argument(
        "--write", action="store_true", help="with --markdown: write docs/configuration.md"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="with --markdown --write: write this file"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from service.config import Settings
    from service.config_reference import DOC_PATH, reference_markdown
    from service.files import atomic_write

    if not args.markdown:
        values = Settings().model_dump(mode="json")
        for key in SECRETS:
            if values.get(key):
                values[key] = "***"
        print(json.dumps(values, indent=2))
        return 0
    text = reference_markdown()
    if args.write or args.output is not None:
        target = args.output or DOC_PATH
        atomic_write(target, text)
        print(f"wrote {target}")
    else:
        print(text, end="")
    return 0
