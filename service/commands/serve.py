"""``facegate serve``: run the REST service with uvicorn (factory mode)."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the REST service",
        description="Serve the REST API with uvicorn. Every other knob is a FACEGATE_* "
        "environment variable (see service/config.py).",
    )
    parser.add_argument("--host", help="bind address (default: FACEGATE_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: FACEGATE_PORT or 8000)")
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes, each loading its own models (default: FACEGATE_WORKERS or 1)",
    )
    parser.add_argument("--log-level", help="uvicorn log level (default: FACEGATE_LOG_LEVEL)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.protocol import PROTOCOL
    from service.config import get_settings

    settings = get_settings()
    workers = args.workers if args.workers is not None else settings.workers
    if workers < 1:
        raise SystemExit("--workers must be at least 1")
    # every worker builds its settings from the environment: its share of the memory
    # (the default decode budget) depends on how many there are
    os.environ["FACEGATE_WORKERS"] = str(workers)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
        workers=workers,
        log_level=(args.log_level or settings.log_level).lower(),
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=10,
        # uvicorn annotates int but only hands it to loop.call_later (seconds as a float)
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
        http=PROTOCOL,  # headers within FACEGATE_HEADER_TIMEOUT_S
    )
    return 0
