"""``facegate gallery export G FILE`` and ``facegate gallery restore FILE [--gallery NEW]``.

Both work directly on the configured store, without a running server (running servers
see a restore through the store's change log).  The file format is described in
:mod:`service.gallery.transfer`.  ``restore`` checks the whole file first and refuses one
of another model than the configured recognizer (``model_mismatch``).

Each prints a JSON summary; exit status 0 on success, 3 with a JSON error when the gallery
or the file is refused, 2 when the configured recognizer cannot be resolved.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ._options import add_model_options, settings_from_args


def add_store_options(parser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="data directory (default: FACEGATE_DATA_DIR)"
    )
    parser.add_argument(
        "--store-url", default=None, help="gallery store URL (default: FACEGATE_STORE_URL)"
    )


def store_settings(args):
    extra = {
        key: value
        for key, value in (("data_dir", args.data_dir), ("store_url", args.store_url))
        if value is not None
    }
    return settings_from_args(args, **extra)


def register(actions) -> None:
    p_export = actions.add_parser(
        "export",
        help="write a gallery to an export file",
        description="Write gallery G with its subjects, faces "
        "(exact embeddings) and stored photos to FILE "
        "(gzip JSON lines).",
    )
    p_export.add_argument("gallery")
    p_export.add_argument("file", type=Path)
    add_store_options(p_export)
    add_model_options(p_export, detector=False)
    p_export.set_defaults(func=run_export)

    p_restore = actions.add_parser(
        "restore",
        help="restore a gallery from an export file",
        description="Restore an export file into a new gallery "
        "of the configured store, in one transaction.",
    )
    p_restore.add_argument("file", type=Path)
    p_restore.add_argument(
        "--gallery",
        default=None,
        help="name of the restored gallery (default: the exported name); it must not exist yet",
    )
    add_store_options(p_restore)
    add_model_options(p_restore, detector=False)
    p_restore.set_defaults(func=run_restore)


def _fail(exc) -> int:
    print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
    return 3


def run_export(args) -> int:
    from service.gallery import GalleryService
    from service.gallery.errors import GalleryError
    from service.gallery.transfer import write_export
    from service.registry import default_registry

    settings = store_settings(args)
    registry = default_registry(settings)
    gallery = GalleryService.offline(settings)
    tmp = args.file.with_name(args.file.name + ".partial")
    try:
        with open(tmp, "wb") as out:
            end = write_export(gallery.store, args.gallery, out, registry.sha256_of)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, args.file)
    except GalleryError as exc:
        tmp.unlink(missing_ok=True)
        return _fail(exc)
    finally:
        gallery.stop()
    print(
        json.dumps(
            {
                "gallery": args.gallery,
                "file": str(args.file),
                "subjects": end["subjects"],
                "faces": end["faces"],
                "sha256": end["sha256"],
            }
        )
    )
    return 0


def run_restore(args) -> int:
    from service.gallery import GalleryService
    from service.gallery.errors import GalleryError
    from service.gallery.transfer import read_export, restore
    from service.registry import ModelError, default_registry, select_recognizer

    settings = store_settings(args)
    try:
        registry = default_registry(settings)
        ref, _ = select_recognizer(settings.recognizer, registry)
        card, _ = registry.resolve(ref, task="recognition")
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with open(args.file, "rb") as source:
            export = read_export(source)
    except GalleryError as exc:
        return _fail(exc)
    gallery = GalleryService.offline(settings)
    try:
        report = restore(gallery, export, card.id, card.sha256, args.gallery)
    except GalleryError as exc:
        return _fail(exc)
    finally:
        gallery.stop()
    print(json.dumps(report))
    return 0
