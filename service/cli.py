"""The ``facegate`` command: each sub-command lives in ``service.commands.<name>``.

Every module listed in ``COMMANDS`` defines ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from service.helptext import summary

COMMANDS = [
    "models",
    "serve",
    "verify",
    "eval_pairs",
    "detect",
    "gallery",
    "keys",
    "audit",
    "config",
    "people",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facegate", description=summary(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"service.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"service.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
