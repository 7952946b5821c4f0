"""``facegate models add PATH``: turn an ONNX file, or an InsightFace-style pack folder of
them, into model cards in the models directory, so that ``FACEGATE_DETECTOR`` /
``FACEGATE_RECOGNIZER`` can serve them by name.

1. Each ``.onnx`` file is classified by its graph (:mod:`service.convert.classify`); in a
   folder, landmark, attribute and swapper models are skipped with the reason, and at most
   one detector and one recognizer are added.
2. A file whose sha256 the catalogue (``models/catalogue.json``) lists takes its name,
   publisher, licence, commercial use and preprocessing from there, each with where it was
   published. A file the manifest itself lists is installed under its manifest name (no card
   is written: the manifest's card is the one).
3. An unknown detector takes its family's published preprocessing (:data:`FAMILY_PREPROCESSING`).
   An unknown recognizer's preprocessing is *measured* when a labelled sample is given
   (:func:`search_preprocessing`): every candidate's figure is reported, and the best one
   (highest ROC AUC over every same-person and different-person pair of the sample) is kept.
   Without a sample the ArcFace convention is written, marked as not measured.
4. Thresholds: only those measured on the labelled sample (the search's, at the false-match
   rates its impostor pairs support: at least 30/FMR of them), marked as such; else none,
   and the service reports its decisions as uncalibrated until the model is calibrated.
5. Nothing is written until every file has been checked; then the model files are copied
   (``<name>.onnx``) and the cards written (``<name>.card.json``) into the models directory.
   The repository's manifest is never touched.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.config import REPO_ROOT
from service.convert.classify import Classified, ClassifyError, classify
from service.files import atomic_write, replace_durably
from service.pipeline.detectors import build_detector
from service.registry import (
    Alignment,
    ModelCard,
    ModelError,
    Preprocessing,
    Registry,
    sha256_file,
)

from .preprocessing_search import (
    LOOSE_CROP_FACTOR,
    MIN_DETECTION_RATE,
    DetectorCheck,
    LabelledSample,
    SearchReport,
    arcface_template,
    check_detector,
    search_preprocessing,
)

if TYPE_CHECKING:
    from service.config import Settings
    from service.pipeline.types import Detector

#: Well-known public files by sha256 (name, publisher, licence, preprocessing, each sourced).
CATALOGUE_PATH = REPO_ROOT / "models" / "catalogue.json"
#: A model name: what ``FACEGATE_DETECTOR`` / ``FACEGATE_RECOGNIZER`` and file names carry.
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
#: The published input convention of each detector family the pipeline decodes.
FAMILY_PREPROCESSING: dict[str, tuple[Preprocessing, str]] = {
    "scrfd": (
        Preprocessing(color="RGB", mean=(127.5, 127.5, 127.5), std=(128.0, 128.0, 128.0)),
        "InsightFace SCRFD convention: RGB, (x-127.5)/128 (insightface/model_zoo/scrfd.py)",
    ),
    "yunet": (
        Preprocessing(color="BGR", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        "YuNet convention: BGR 0-255, no normalisation (OpenCV FaceDetectorYN)",
    ),
    "retinaface": (
        Preprocessing(color="BGR", mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0)),
        "RetinaFace PyTorch convention: BGR minus (104, 117, 123) (Pytorch_Retinaface detect.py)",
    ),
}


class AddError(ValueError):
    """The path cannot be added; nothing was written."""


@dataclass(frozen=True)
class Skipped:
    path: Path
    kind: str
    reason: str


@dataclass(frozen=True)
class Added:
    card: ModelCard
    card_path: Path | None  # None: the manifest's own card serves it
    model_path: Path
    classified: Classified
    catalogue: dict[str, Any] | None
    search: SearchReport | None
    notes: tuple[str, ...]
    detector_check: DetectorCheck | None = None


@dataclass(frozen=True)
class AddResult:
    added: tuple[Added, ...]
    skipped: tuple[Skipped, ...]
    seconds: float


# -- labelled samples ------------------------------------------------------------------------
# -- the catalogue ---------------------------------------------------------------------------
def load_catalogue(path: Path = CATALOGUE_PATH) -> dict[str, dict[str, Any]]:
    """Catalogue entries by sha256."""
    if not path.is_file():
        return {}
    return {entry["sha256"]: entry for entry in json.loads(path.read_text())["models"]}


# -- add -------------------------------------------------------------------------------------
@dataclass
class _Plan:
    classified: Classified
    sha256: str
    name: str
    card: ModelCard | None = None
    catalogue: dict[str, Any] | None = None
    search: SearchReport | None = None
    notes: list[str] = field(default_factory=list)
    manifest_name: str | None = None
    detector_check: DetectorCheck | None = None


def _onnx_files(path: Path) -> tuple[list[Path], bool]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".onnx" and p.is_file())
        if not files:
            raise AddError(f"{path}: the folder holds no .onnx file")
        return files, True
    if not path.is_file():
        raise AddError(f"{path}: no such file or folder")
    return [path], False


def _check_name(name: str, registry: Registry, models_dir: Path, replace: bool) -> None:
    if not NAME_RE.match(name) or name in (".", ".."):
        raise AddError(
            f"model name {name!r}: 1-64 characters of A-Z a-z 0-9 _ . -, not starting with . or -"
        )
    if name in registry.manifest_cards:
        raise AddError(f"name {name!r} is taken by the repository's manifest; choose --name")
    card_path = models_dir / f"{name}.card.json"
    if name in registry.cards and not card_path.is_file():
        raise AddError(f"name {name!r} is taken by a shipped model card; choose --name")
    if not replace and (card_path.is_file() or (models_dir / f"{name}.onnx").exists()):
        raise AddError(
            f"name {name!r} is taken in {models_dir} (a card or file of that name is there); "
            "choose --name, or --replace to overwrite it"
        )


def add_models(
    path: Path,
    settings: Settings,
    registry: Registry,
    *,
    name: str | None = None,
    licence: str | None = None,
    sample: LabelledSample | None = None,
    replace: bool = False,
    catalogue: bool = True,
    progress=None,
) -> AddResult:
    """Classify, identify, measure and write (see the module docstring)."""
    start = time.perf_counter()
    path = Path(path)
    models_dir = Path(settings.models_dir)
    files, is_pack = _onnx_files(path)
    known = load_catalogue() if catalogue else {}
    skipped: list[Skipped] = []
    plans: list[_Plan] = []
    for file in files:
        try:
            found = classify(file)
        except ClassifyError as exc:
            if not is_pack:
                raise AddError(str(exc)) from None
            skipped.append(Skipped(file, "unknown", str(exc)))
            continue
        if not found.servable:
            if not is_pack:
                raise AddError(
                    f"{file}: {found.reason}, not a face detector or recognizer the pipeline serves"
                )
            skipped.append(
                Skipped(
                    file,
                    found.kind,
                    f"{found.reason}; the pipeline serves detectors and recognizers only",
                )
            )
            continue
        plans.append(_Plan(found, sha256_file(file), ""))
    for kind in ("detection", "recognition"):
        of_kind = [p for p in plans if p.classified.kind == kind]
        if len(of_kind) > 1:
            listed = ", ".join(p.classified.path.name for p in of_kind)
            raise AddError(f"{path}: {len(of_kind)} {kind} models ({listed}); add them one by one")
    if not plans:
        raise AddError(f"{path}: no face detector or recognizer in it")

    for plan in plans:
        entry = known.get(plan.sha256)
        plan.catalogue = entry
        manifest = [c for c in registry.manifest_cards.values() if c.sha256 == plan.sha256]
        if is_pack:
            base = name or path.name
            plan.name = f"{base}_{'det' if plan.classified.kind == 'detection' else 'rec'}"
        else:
            plan.name = name or (entry or {}).get("name") or plan.classified.path.stem
        if manifest and catalogue and name is None and not is_pack:
            plan.manifest_name = manifest[0].name
            continue
        _check_name(plan.name, registry, models_dir, replace)
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise AddError(f"two models would be named {names[0]!r}; give --name")

    pack_detector: Detector | None = None
    for plan in sorted(plans, key=lambda p: p.classified.kind != "detection"):
        if plan.manifest_name is not None:
            continue
        plan.card = _card(plan, licence)
        if plan.classified.kind == "detection":
            try:
                pack_detector = build_detector(plan.card, plan.classified.path, settings)
            except Exception as exc:
                raise AddError(
                    f"{plan.classified.path}: the {plan.card.family} decoder cannot run it: {exc}"
                ) from None
            if sample is not None:
                plan.detector_check = check_detector(pack_detector, settings, sample)
                plan.card = _checked_card(plan.card, plan.detector_check)
                if plan.detector_check.rate < MIN_DETECTION_RATE:
                    plan.notes.append(
                        f"WARNING: the detector finds a face in only "
                        f"{plan.detector_check.with_face} of {plan.detector_check.images} "
                        "photos of the sample: its preprocessing or decoding may be wrong"
                    )
            continue
        if plan.catalogue is None and sample is not None:
            detector = pack_detector or _served_detector(settings, registry)
            plan.search = search_preprocessing(
                plan.classified.path, plan.classified, detector, settings, sample, progress
            )
            plan.card = _measured_card(plan.card, plan.search)
        elif plan.catalogue is None:
            plan.notes.append(
                "preprocessing NOT measured (no labelled sample): the ArcFace convention "
                "(RGB, (x-127.5)/128, ArcFace template) is assumed; give --pairs/--images or "
                "--calibrate to measure it"
            )
        if not plan.card.thresholds:
            plan.notes.append(
                "no thresholds: decisions are uncalibrated (threshold 0.5, calibrated: false) "
                "until the model is calibrated on labelled photos"
            )

    return AddResult(
        tuple(_write(plans, models_dir, list(registry.manifest_cards.values()))),
        tuple(skipped),
        round(time.perf_counter() - start, 2),
    )


def _served_detector(settings: Settings, registry: Registry) -> Detector:
    try:
        card, det_path = registry.resolve(settings.detector, task="detection")
    except ModelError as exc:
        raise AddError(f"the detector for the preprocessing search: {exc}") from None
    return build_detector(card, det_path, settings)


def _card(plan: _Plan, licence: str | None) -> ModelCard:
    found = plan.classified
    entry = plan.catalogue
    provenance: dict[str, Any] = {
        "added_by": "facegate models add",
        "classified": found.reason,
        "input_shape": list(found.input_shape),
    }
    if entry is not None:
        pre = Preprocessing.model_validate(entry["preprocessing"])
        provenance["catalogue"] = {
            k: entry[k] for k in ("name", "publisher", "published") if k in entry
        }
        provenance["preprocessing_from"] = "catalogue"
    elif found.kind == "detection":
        pre, why = FAMILY_PREPROCESSING[found.family]
        provenance["preprocessing_from"] = f"family convention: {why}"
    else:
        pre = Preprocessing(color="RGB")
        provenance["preprocessing_from"] = "assumed (ArcFace convention), not measured"
    pre = pre.model_copy(update={"input_size": found.input_size, "layout": found.layout})
    alignment = None
    if found.kind == "recognition" and entry is not None and "alignment" in entry:
        alignment = Alignment.model_validate(entry["alignment"])
    elif found.kind == "recognition":
        size = found.input_size or (112, 112)
        alignment = Alignment(template=arcface_template(size), size=size)
    return ModelCard(
        name=plan.name,
        task=found.kind,
        family=(entry or {}).get("family") or found.family,
        file=f"{plan.name}.onnx",
        sha256=plan.sha256,
        source=str(found.path.resolve()),
        licence=licence or (entry or {}).get("licence") or "unknown",
        commercial_use=bool((entry or {}).get("commercial_use", False)) if not licence else False,
        description=(entry or {}).get("publisher") or f"added from {found.path.name}",
        preprocessing=pre,
        alignment=alignment,
        embedding_dim=found.embedding_dim,
        evaluation={"models_add": provenance},
    )


def _checked_card(card: ModelCard, check: DetectorCheck) -> ModelCard:
    evaluation = dict(card.evaluation)
    evaluation["models_add"] = {
        **evaluation["models_add"],
        "detector_check": {
            "images": check.images,
            "with_face": check.with_face,
            "mean_top_score": check.mean_score,
        },
    }
    return card.model_copy(update={"evaluation": evaluation})


def _measured_card(card: ModelCard, report: SearchReport) -> ModelCard:
    best = report.best
    size = card.preprocessing.input_size or (112, 112)
    factor = 1.0 if best.crop == "ArcFace template" else LOOSE_CROP_FACTOR
    pre = card.preprocessing.model_copy(
        update={"color": best.color, "mean": best.mean, "std": best.std}
    )
    evaluation = dict(card.evaluation)
    evaluation["models_add"] = {
        **evaluation["models_add"],
        "preprocessing_from": f"measured: {report.metric}",
        "preprocessing_search": {
            "sample": report.sample,
            "chosen": best.label,
            "candidates": {f.label: round(f.auc, 6) for f in report.candidates},
        },
    }
    if report.thresholds:
        evaluation["thresholds_source"] = (
            f"measured on the preprocessing search's sample ({report.sample}: "
            f"{report.persons} persons, {report.genuine_pairs} same-person and "
            f"{report.impostor_pairs} different-person pairs); not a deployment calibration"
        )
    default = "fmr_1e-3" if "fmr_1e-3" in report.thresholds else next(iter(report.thresholds), None)
    return card.model_copy(
        update={
            "preprocessing": pre,
            "alignment": Alignment(template=arcface_template(size, factor), size=size),
            "thresholds": dict(report.thresholds),
            "default_operating_point": default,
            "evaluation": evaluation,
        }
    )


def _write(
    plans: Sequence[_Plan], models_dir: Path, registry_cards: Sequence[ModelCard]
) -> list[Added]:
    """Copy every file and write every card into place, each atomically (temp + rename)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    added: list[Added] = []
    for plan in plans:
        if plan.manifest_name is not None:
            card = next(c for c in registry_cards if c.name == plan.manifest_name)
            target = models_dir / card.file
            _copy(plan.classified.path, target)
            note = (
                f"this file is the manifest's model {card.name}: its file is installed and "
                "the manifest's card serves it"
            )
            added.append(Added(card, None, target, plan.classified, plan.catalogue, None, (note,)))
            continue
        assert plan.card is not None
        target = models_dir / plan.card.file
        card_path = models_dir / f"{plan.card.name}.card.json"
        _copy(plan.classified.path, target)
        atomic_write(card_path, plan.card.model_dump_json(indent=2, exclude_none=True) + "\n")
        added.append(
            Added(
                plan.card,
                card_path,
                target,
                plan.classified,
                plan.catalogue,
                plan.search,
                tuple(plan.notes),
                plan.detector_check,
            )
        )
    return added


def _copy(source: Path, target: Path) -> None:
    if target.resolve() == source.resolve():
        return
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    replace_durably(tmp, target)
