"""``facegate people scan DIR --gallery g``, ``people cluster`` and ``people report``:
people discovery on the configured store, without a running server.

* ``scan`` adds every photo under ``DIR`` (``.jpg``, ``.jpeg``, ``.png``, ``.webp``,
  ``.bmp``) to the gallery like ``POST /v1/galleries/{g}/photos`` (every face; automatic
  assignment to the gallery's subjects), with a progress bar on stderr; it is resumable:
  a photo the gallery holds (same sha256) is skipped.  Then it clusters, without the
  request bound (``--no-cluster`` skips that).  A JSON summary is the last line on stdout.
* ``cluster`` runs the clustering alone (``POST .../clusters/run`` without its bound).
* ``name``, ``merge``, ``split``, ``move``, ``remove``: the corrections of
  ``POST .../clusters/{c}/name`` and the rest, one store transaction each, audited as the
  key ``cli``; they print the changed cluster or face as JSON.
* ``report --out DIR`` writes an HTML contact sheet, ``DIR/index.html``: one row of face
  thumbnails per cluster, largest first (needs ``FACEGATE_PEOPLE_THUMBNAILS=true`` while the
  photos were added).

Running servers see assignments through the store's change log.  Exit status 0 on
success, 3 with a JSON error when the gallery refuses, 2 when the models cannot be loaded.
"""

from __future__ import annotations

import html
import json
import sys
import time
from pathlib import Path

from service.helptext import summary

from ._options import add_model_options, load_pipeline, served_recognizer, settings_from_args

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
REPORT_FACES = 40  # thumbnails shown per cluster row


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "people", help="people discovery in photo folders", description=summary(__doc__)
    )
    actions = parser.add_subparsers(dest="action", required=True)
    scan = actions.add_parser("scan", help="add a folder of photos, then cluster")
    scan.add_argument("directory", type=Path)
    scan.add_argument("--no-cluster", action="store_true", help="only add the photos")
    cluster = actions.add_parser("cluster", help="cluster the gallery's faces")
    report = actions.add_parser("report", help="write an HTML contact sheet of the clusters")
    report.add_argument("--out", type=Path, required=True, help="directory to write it to")
    name = actions.add_parser("name", help="name a cluster: its faces become a subject's")
    name.add_argument("cluster_id")
    name.add_argument("--subject", required=True, help="subject id (created if absent)")
    merge = actions.add_parser("merge", help="merge cluster SOURCE into cluster CLUSTER_ID")
    merge.add_argument("cluster_id")
    merge.add_argument("source")
    split = actions.add_parser("split", help="move faces of a cluster into a new cluster")
    split.add_argument("cluster_id")
    split.add_argument("face_ids", type=int, nargs="+")
    move = actions.add_parser("move", help="move a face to a cluster or a subject")
    move.add_argument("face_id", type=int)
    target = move.add_mutually_exclusive_group(required=True)
    target.add_argument("--cluster", dest="to_cluster")
    target.add_argument("--subject", dest="to_subject")
    remove = actions.add_parser("remove", help="take a face out of its cluster and subject")
    remove.add_argument("face_id", type=int)
    corrections = (name, merge, split, move, remove)
    for action in (scan, cluster, report, *corrections):
        action.add_argument("--gallery", required=True)
        action.add_argument("--data-dir", type=Path, default=None)
        action.add_argument("--store-url", default=None)
        add_model_options(action)
    for action in corrections:
        action.set_defaults(func=run_correction)
    scan.set_defaults(func=run_scan)
    cluster.set_defaults(func=run_cluster)
    report.set_defaults(func=run_report)


def _settings(args):
    extra = {
        key: value
        for key, value in (("data_dir", args.data_dir), ("store_url", args.store_url))
        if value is not None
    }
    return settings_from_args(args, gallery_snapshots=False, **extra)


def _refused(exc) -> int:
    print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
    return 3


def photos_under(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES
    )


def run_scan(args) -> int:
    from tqdm import tqdm

    from service.gallery import GalleryService
    from service.gallery.errors import GalleryError
    from service.pipeline.errors import PipelineError
    from service.usecases import people

    settings = _settings(args)
    pipeline = load_pipeline(settings)
    if pipeline is None:
        return 2
    if not args.directory.is_dir():
        print(f"error: {args.directory} is not a directory", file=sys.stderr)
        return 2
    gallery = GalleryService(settings)
    gallery.start()  # the indexes: automatic assignment searches the gallery's subjects
    counts = {"photos": 0, "added": 0, "already_added": 0, "refused": 0, "faces": 0}
    refused: list[dict] = []
    began = time.perf_counter()
    try:
        gallery.create_gallery(args.gallery, pipeline.model_id, pipeline.dim)
        files = photos_under(args.directory)
        for path in tqdm(files, desc="photos", unit="photo", file=sys.stderr):
            counts["photos"] += 1
            data = path.read_bytes()
            digest = people.photo_id(data)
            if people.known_photo(gallery, args.gallery, digest, settings) is not None:
                counts["already_added"] += 1
                continue
            try:
                found = pipeline.analyze(data, "all", allow_none=True, limit=settings.max_faces)
            except PipelineError as exc:
                counts["refused"] += 1
                refused.append({"path": str(path), "code": exc.code})
                continue
            result = people.add_photo(
                gallery,
                pipeline.recognizer_card,
                settings,
                args.gallery,
                pipeline.model_id,
                digest,
                found,
            )
            counts["added"] += 1
            counts["faces"] += len(result.faces)
        summary_: dict = {"gallery": args.gallery, **counts, "refused_photos": refused[:100]}
        summary_["scan_s"] = round(time.perf_counter() - began, 2)
        if not args.no_cluster:
            run = people.run_clustering(
                gallery, pipeline.recognizer_card, settings, args.gallery, pipeline.model_id
            )
            summary_["clustering"] = run.to_dict()
    except GalleryError as exc:
        return _refused(exc)
    finally:
        gallery.stop()
    print(json.dumps(summary_))
    return 0


def run_cluster(args) -> int:
    from service.gallery import GalleryService
    from service.gallery.errors import GalleryError
    from service.usecases import people

    settings = _settings(args)
    pipeline = load_pipeline(settings)
    if pipeline is None:
        return 2
    gallery = GalleryService(settings)
    gallery.start()
    try:
        run = people.run_clustering(
            gallery, pipeline.recognizer_card, settings, args.gallery, pipeline.model_id
        )
    except GalleryError as exc:
        return _refused(exc)
    finally:
        gallery.stop()
    print(json.dumps(run.to_dict()))
    return 0


def run_report(args) -> int:
    from service.gallery import GalleryService
    from service.gallery.errors import GalleryError
    from service.usecases import people

    settings = _settings(args)
    gallery = GalleryService.offline(settings)
    out: Path = args.out
    (out / "faces").mkdir(parents=True, exist_ok=True)
    rows, written, missing = [], 0, 0
    try:
        cursor = None
        while True:
            page, cursor = people.list_clusters(gallery, args.gallery, people.MAX_PAGE, cursor)
            for cluster in page:
                cells = []
                for face_id in cluster["face_ids"][:REPORT_FACES]:
                    data = people.face_thumbnail(gallery, args.gallery, face_id)
                    if data is None:
                        missing += 1
                        cells.append(f'<span class="none">#{face_id}</span>')
                        continue
                    (out / "faces" / f"{face_id}.jpg").write_bytes(data)
                    written += 1
                    cells.append(f'<img src="faces/{face_id}.jpg" title="face {face_id}">')
                name = html.escape(cluster["subject_id"] or "unnamed")
                rows.append(
                    f"<tr><th>{cluster['cluster_id']}<br>{name}<br>{cluster['size']} faces</th>"
                    f"<td>{''.join(cells)}</td></tr>"
                )
            if cursor is None:
                break
    except GalleryError as exc:
        return _refused(exc)
    finally:
        gallery.stop()
    title = html.escape(f"facegate people: {args.gallery}")
    (out / "index.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>{title}</title>"
        "<style>img{width:72px;height:72px;margin:1px}th{text-align:left;padding-right:1em}"
        ".none{display:inline-block;width:72px}</style>"
        f"<h1>{title}</h1><table>{''.join(rows)}</table>",
        encoding="utf-8",
    )
    print(
        json.dumps(
            {
                "gallery": args.gallery,
                "clusters": len(rows),
                "thumbnails": written,
                "without_thumbnail": missing,
                "report": str(out / "index.html"),
            }
        )
    )
    return 0


def run_correction(args) -> int:
    from service.gallery import GalleryService
    from service.gallery.audit import AuditEntry, recording
    from service.gallery.errors import GalleryError
    from service.usecases import people

    settings = _settings(args)
    served = served_recognizer(settings)
    if served is None:
        return 2
    _, model_id = served
    actions = {
        "name": (
            "name_cluster",
            lambda g: people.name_cluster(
                g, args.gallery, args.cluster_id, args.subject, None, model_id
            ),
        ),
        "merge": (
            "merge_clusters",
            lambda g: people.merge_clusters(
                g, args.gallery, args.cluster_id, args.source, model_id
            ),
        ),
        "split": (
            "split_cluster",
            lambda g: people.split_cluster(g, args.gallery, args.cluster_id, list(args.face_ids)),
        ),
        "move": (
            "move_face",
            lambda g: people.move_face(
                g, args.gallery, args.face_id, model_id, args.to_cluster, args.to_subject
            ),
        ),
        "remove": ("remove_face", lambda g: people.remove_face(g, args.gallery, args.face_id)),
    }
    audit_action, change = actions[args.action]
    gallery = GalleryService.offline(settings)
    try:
        entry = AuditEntry(audit_action, key_id="cli", client="local", gallery=args.gallery)
        with recording(entry):
            result = change(gallery)
    except GalleryError as exc:
        return _refused(exc)
    finally:
        gallery.stop()
    print(json.dumps(result))
    return 0
