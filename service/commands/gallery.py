"""``facegate gallery reenrol --source OLD --target NEW``: re-enrol a gallery with the current
models.

Works directly on the configured store (``FACEGATE_STORE_URL``, or the SQLite file
in ``FACEGATE_DATA_DIR``) without a running server, with the configured detector
and recognizer (``FACEGATE_DETECTOR`` / ``FACEGATE_RECOGNIZER`` or the options), the
same way as ``POST /v1/galleries/NEW/reenrol`` (see ``service.reenrol``).  Running
servers see the new faces through the store's change log; a stopped one picks them
up when it starts.

Prints the report as JSON; exit status 0 on success, 3 with a JSON error when the
gallery refuses (unknown source, other model, no stored images), 2 when the models
cannot be loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.helptext import summary

from . import gallery_transfer
from ._options import add_model_options, load_pipeline, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "gallery",
        help="gallery maintenance",
        description="Gallery maintenance on the configured store.",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    p_reenrol = actions.add_parser(
        "reenrol", help="re-enrol a gallery with the current models", description=summary(__doc__)
    )
    p_reenrol.add_argument("--source", required=True, help="gallery to re-enrol from")
    p_reenrol.add_argument(
        "--target", required=True, help="gallery to enrol into (created for the current model)"
    )
    p_reenrol.add_argument(
        "--data-dir", type=Path, default=None, help="data directory (default: FACEGATE_DATA_DIR)"
    )
    p_reenrol.add_argument(
        "--store-url", default=None, help="gallery store URL (default: FACEGATE_STORE_URL)"
    )
    add_model_options(p_reenrol)
    p_reenrol.set_defaults(func=run_reenrol)
    gallery_transfer.register(actions)


def run_reenrol(args) -> int:
    import asyncio

    from service.gallery import GalleryService
    from service.gallery.errors import GalleryError
    from service.pipeline.types import Timings
    from service.usecases.galleries import reenrol
    from service.usecases.work import Worker

    extra = {
        key: value
        for key, value in (("data_dir", args.data_dir), ("store_url", args.store_url))
        if value is not None
    }
    settings = settings_from_args(args, **extra)
    pipeline = load_pipeline(settings)
    if pipeline is None:
        return 2
    gallery = GalleryService.offline(settings)
    try:
        report = asyncio.run(
            reenrol(
                work=Worker(pipeline, threads=False),
                gallery=gallery,
                settings=settings,
                source=args.source,
                target=args.target,
                timings=Timings(),
            )
        )
    except GalleryError as exc:
        print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
        return 3
    finally:
        gallery.stop()
    print(json.dumps(report.to_dict()))
    return 0
