"""``facegate gallery export G FILE``, ``restore FILE [--gallery NEW]``, ``import DIR --gallery G``.

All three work directly on the configured store, without a running server (running servers
see a restore or an import through the store's change log).  The file format is described in
:mod:`service.gallery.transfer`.  ``restore`` checks the whole file first and refuses one
of another model than the configured recognizer (``model_mismatch``).

``import`` is :class:`service.usecases.enrol_many.DirectoryImport`, with a progress bar
(photos/s, ETA) on stderr and every refused photo listed before the JSON summary.

Each prints a JSON summary as its last line; exit status 0 on success, 3 with a JSON error
when the gallery or the file is refused, 2 when the models cannot be resolved.  Restores and
imports leave audit records with key id ``cli``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ._options import add_model_options, served_recognizer, settings_from_args

#: The key id of the audit records of commands run on the store.
CLI_KEY_ID = "cli"


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

    p_import = actions.add_parser(
        "import",
        help="enrol a directory of photos (DIR/<subject_id>/*.jpg|png|webp)",
        description="Enrol every photo of DIR/<subject_id>/ into gallery G in batches, under "
        "the enrolment quality rules; subjects are created as needed; photos "
        "already enrolled (same sha256) are skipped, so an interrupted import can "
        "be run again.",
    )
    p_import.add_argument("directory", type=Path)
    p_import.add_argument("--gallery", required=True, help="gallery to enrol into")
    p_import.add_argument(
        "--batch", type=int, default=16, help="photos detected and embedded together (default 16)"
    )
    p_import.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_store_options(p_import)
    add_model_options(p_import)
    p_import.set_defaults(func=run_import)


def _fail(exc) -> int:
    print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
    return 3


def run_export(args) -> int:
    from service.files import atomic_file
    from service.gallery import GalleryService
    from service.gallery.errors import GalleryError
    from service.registry import default_registry
    from service.usecases.transfer import export_gallery

    settings = store_settings(args)
    registry = default_registry(settings)
    gallery = GalleryService.offline(settings)
    try:
        with atomic_file(args.file, suffix=".partial") as out:
            end = export_gallery(
                store=gallery.store, gallery=args.gallery, out=out, sha256_of=registry.sha256_of
            )
    except GalleryError as exc:
        return _fail(exc)
    finally:
        gallery.stop()
    print(
        json.dumps(
            {
                "gallery": args.gallery,
                "file": str(args.file),
                "subjects": end.subjects,
                "faces": end.faces,
                "sha256": end.sha256,
            }
        )
    )
    return 0


def run_restore(args) -> int:
    from service.gallery import GalleryService
    from service.gallery.audit import AuditEntry
    from service.gallery.errors import GalleryError
    from service.gallery.transfer import read_export
    from service.usecases.transfer import restore_gallery

    settings = store_settings(args)
    served = served_recognizer(settings)
    if served is None:
        return 2
    card, model_id = served
    try:
        with open(args.file, "rb") as source:
            export = read_export(source, settings.max_image_bytes)
    except GalleryError as exc:
        return _fail(exc)
    gallery = GalleryService.offline(settings)
    try:
        entry = AuditEntry(
            "restore", key_id=CLI_KEY_ID, client="local", gallery=args.gallery or export.gallery
        )
        report = restore_gallery(
            gallery=gallery,
            export=export,
            model_id=model_id,
            model_sha256=card.sha256,
            target=args.gallery,
            audit=entry,
        )
    except GalleryError as exc:
        return _fail(exc)
    finally:
        gallery.stop()
    print(json.dumps(report.to_dict()))
    return 0


def run_import(args) -> int:
    from tqdm import tqdm

    from service.gallery import GalleryService
    from service.gallery.audit import AuditEntry, recording
    from service.gallery.errors import GalleryError
    from service.usecases.enrol_many import DirectoryImport

    from ._options import load_pipeline

    if not args.directory.is_dir():
        print(f"error: {args.directory} is not a directory", file=sys.stderr)
        return 2
    settings = store_settings(args)
    pipeline = load_pipeline(settings)
    if pipeline is None:
        return 2
    gallery = GalleryService.offline(settings)
    try:
        job = DirectoryImport(gallery, pipeline, settings, args.directory, args.gallery, args.batch)
        with tqdm(
            total=len(job.photos),
            unit="photo",
            desc=f"import {args.gallery}",
            file=sys.stderr,
            disable=args.no_progress,
            dynamic_ncols=True,
        ) as bar:

            def progress(done: int, report) -> None:
                bar.update(done - bar.n)
                rate = report.enrolled / report.seconds if report.seconds > 0 else 0.0
                bar.set_postfix(
                    enrolled=report.enrolled, refused=len(report.refused), faces_s=f"{rate:.1f}"
                )

            entry = AuditEntry("import", key_id=CLI_KEY_ID, client="local", gallery=args.gallery)
            with recording(entry):
                summary = job.run(progress)
    except GalleryError as exc:
        return _fail(exc)
    finally:
        gallery.stop()
    for refusal in summary["refusals"]:
        print(f"refused {refusal['path']}: {refusal['code']}: {refusal['message']}")
    print(
        f"{summary['enrolled']} enrolled, {summary['already_enrolled']} already enrolled, "
        f"{summary['refused']} refused of {summary['photos']} photos in "
        f"{summary['seconds']} s ({summary['faces_per_s']} faces/s)"
    )
    print(json.dumps(summary))
    return 0
