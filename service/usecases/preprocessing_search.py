"""The labelled sample and the measurements ``facegate models add`` makes on it.

- :func:`search_preprocessing`: an unknown recognizer's preprocessing, measured. The sample's
  photos go through the served detector and the pipeline's alignment (the largest face of
  each), under every candidate: RGB/BGR × ``(x-127.5)/128``, ``x/255``, raw 0-255, Caffe
  means × the ArcFace 112 template scaled to the input size, and a looser crop (the template
  shrunk by :data:`LOOSE_CROP_FACTOR` towards the centre). The figure is the ROC AUC over
  every same-person and every different-person pair of the sample (TMR at FMR 1e-2 beside
  it); the highest wins, the first of equals in candidate order. Every figure is reported,
  and a warning says when the runner-up is within 0.002, when the sample is grayscale (the
  colour order cannot be measured: only RGB is tried), or when even the best is poor.
- :func:`sample_thresholds`: thresholds at the FMRs the impostor pairs support
  (Doddington's rule of 30: at least 30/FMR of them).
- :func:`check_detector`: how often a detector finds a face in the sample's photos.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.convert.classify import Classified
from service.pipeline.align import align_faces
from service.pipeline.embed import OnnxEmbedder
from service.pipeline.errors import PipelineError
from service.pipeline.pairs import FMR_POINTS, operating_point, parse_pairs
from service.pipeline.pipeline import Pipeline
from service.registry import ARCFACE_TEMPLATE_112, ModelCard, Preprocessing

if TYPE_CHECKING:
    from service.config import Settings
    from service.pipeline.types import Detector


class SampleError(ValueError):
    """The labelled sample cannot be read or cannot drive a measurement."""


#: Doddington's rule of 30: an FMR is measured only with at least 30/FMR impostor pairs.
RULE_OF_30 = 30
#: A detector that finds a face in fewer of the sample's photos is reported as suspect.
MIN_DETECTION_RATE = 0.9
#: The ArcFace template shrunk towards the crop centre by this factor: the looser crop.
LOOSE_CROP_FACTOR = 0.8

#: Colour/normalisation candidates of the recognizer search: (label, colour, mean, std).
NORMALISATIONS: list[tuple[str, tuple[float, float, float], tuple[float, float, float]]] = [
    ("(x-127.5)/128", (127.5, 127.5, 127.5), (128.0, 128.0, 128.0)),
    ("x/255", (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)),
    ("raw 0-255", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ("Caffe means", (104.0, 117.0, 123.0), (1.0, 1.0, 1.0)),  # B, G, R order
]


@dataclass(frozen=True)
class LabelledSample:
    """Photos with the identity of the person in each (``images[i]`` shows ``labels[i]``)."""

    images: tuple[Path, ...]
    labels: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class CandidateFigure:
    """One preprocessing candidate and how well it separates same from different people."""

    label: str
    color: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: str
    auc: float
    tmr_at_fmr_1e_2: float | None


@dataclass(frozen=True)
class SearchReport:
    metric: str
    candidates: tuple[CandidateFigure, ...]
    chosen: int
    images: int
    persons: int
    no_face: int
    genuine_pairs: int
    impostor_pairs: int
    seconds: float
    thresholds: dict[str, float]
    threshold_notes: tuple[str, ...]
    warnings: tuple[str, ...]
    sample: str

    @property
    def best(self) -> CandidateFigure:
        return self.candidates[self.chosen]


@dataclass(frozen=True)
class DetectorCheck:
    """How often a detector finds a face in the sample's photos (each holds one person)."""

    images: int
    with_face: int
    mean_score: float
    seconds: float

    @property
    def rate(self) -> float:
        return self.with_face / max(1, self.images)


#: Photos of each person a limited sample takes from a folder per person.
PHOTOS_PER_PERSON = 4
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def sample_from_dir(directory: Path, limit: int | None = None) -> LabelledSample:
    """One sub-folder per person. With ``limit``: at most that many images, up to
    :data:`PHOTOS_PER_PERSON` of each person, persons in folder order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SampleError(f"--calibrate {directory}: not a directory")
    people = {
        p.name: sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for p in sorted(directory.iterdir())
        if p.is_dir()
    }
    people = {k: v for k, v in people.items() if v}
    if len(people) < 2:
        raise SampleError(f"--calibrate {directory}: needs sub-folders of photos for two persons")
    images: list[Path] = []
    labels: list[str] = []
    for person, files in people.items():
        for file in files if limit is None else files[:PHOTOS_PER_PERSON]:
            if limit is not None and len(images) >= limit:
                break
            images.append(file)
            labels.append(person)
    return LabelledSample(
        tuple(images),
        tuple(labels),
        f"{directory} ({len(images)} images, {len(set(labels))} persons)",
    )


def sample_from_pairs(pairs: Path, images_dir: Path, limit: int | None = None) -> LabelledSample:
    """The images of an LFW-format ``pairs.txt`` (same and different pairs in turn), up to
    ``limit`` images; the identity of an image is its folder."""
    try:
        listed = parse_pairs(pairs)
    except (OSError, ValueError) as exc:
        raise SampleError(f"--pairs {pairs}: {exc}") from None
    same = [p for p in listed if p.same]
    different = [p for p in listed if not p.same]
    ordered = [p for two in zip(same, different, strict=False) for p in two]
    keys: dict[str, None] = {}
    for pair in ordered:
        if limit is not None and len(keys) >= limit:
            break
        keys.setdefault(pair.a)
        keys.setdefault(pair.b)
    missing = [k for k in keys if not (Path(images_dir) / k).is_file()]
    if missing:
        raise SampleError(
            f"--images {images_dir}: {len(missing)} images missing, e.g. {missing[0]}"
        )
    return LabelledSample(
        tuple(Path(images_dir) / k for k in keys),
        tuple(k.split("/")[0] for k in keys),
        f"{Path(pairs).resolve()} ({len(keys)} images)",
    )


# -- the preprocessing search ----------------------------------------------------------------
def arcface_template(size: tuple[int, int], factor: float = 1.0) -> list[tuple[float, float]]:
    """The ArcFace 112×112 template scaled to a crop of ``size`` (w, h); ``factor`` < 1
    shrinks it towards the crop centre (a looser crop: more context around the face)."""
    width, height = size
    points = np.asarray(ARCFACE_TEMPLATE_112, np.float64) * [width / 112.0, height / 112.0]
    centre = np.asarray([width / 2.0, height / 2.0])
    points = centre + (points - centre) * factor
    return [(round(float(x), 4), round(float(y), 4)) for x, y in points]


def _read(locator: Pipeline, path: Path) -> np.ndarray:
    """A sample photo, decoded within the service's limits; SampleError names one that
    cannot be read."""
    try:
        return locator.decode(path.read_bytes())
    except (OSError, PipelineError) as exc:
        raise SampleError(f"sample photo {path}: {exc}") from None


def _is_gray(image: np.ndarray) -> bool:
    """Whether the three channels of a BGR image are equal (a grayscale photo)."""
    return bool(
        np.array_equal(image[..., 0], image[..., 1])
        and np.array_equal(image[..., 1], image[..., 2])
    )


def _pair_scores(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) cosines of every pair of the sample (upper triangle)."""
    sims = embeddings @ embeddings.T
    upper = np.triu(np.ones(sims.shape, bool), k=1)
    same = labels[:, None] == labels[None, :]
    return sims[upper & same], sims[upper & ~same]


def _auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([genuine, impostor])
    truth = np.concatenate([np.ones(len(genuine)), np.zeros(len(impostor))])
    return float(roc_auc_score(truth, scores))


def sample_thresholds(
    genuine: np.ndarray, impostor: np.ndarray
) -> tuple[dict[str, float], list[str]]:
    """Thresholds at the FMRs the impostor pairs support (rule of 30), and why others are not
    given."""
    thresholds: dict[str, float] = {}
    notes: list[str] = []
    for point, fmr in FMR_POINTS.items():
        needed = int(np.ceil(RULE_OF_30 / fmr))
        if len(impostor) < needed:
            notes.append(f"{point}: not measured ({len(impostor)} impostor pairs; {needed} needed)")
            continue
        measured = operating_point(impostor, genuine, fmr)
        thresholds[point] = round(float(measured["threshold"]), 6)
    return thresholds, notes


def search_preprocessing(
    path: Path,
    classified: Classified,
    detector: Detector,
    settings: Settings,
    sample: LabelledSample,
    progress=None,
) -> SearchReport:
    """Embed the sample's main faces (the served detector, the largest face, the pipeline's
    alignment) under every candidate and keep the one with the highest ROC AUC."""
    start = time.perf_counter()
    size = classified.input_size or (112, 112)
    crops_by_template = {
        "ArcFace template": arcface_template(size),
        f"looser crop (ArcFace x{LOOSE_CROP_FACTOR})": arcface_template(size, LOOSE_CROP_FACTOR),
    }
    locator = Pipeline(
        detector,
        None,
        settings,
        template=np.asarray(crops_by_template["ArcFace template"]),
        crop_size=size,
    )
    # each photo is aligned at once under every crop candidate and let go: only the small
    # crops are kept, whatever the size of the photos
    crops_of: dict[str, list[np.ndarray]] = {label: [] for label in crops_by_template}
    labels: list[str] = []
    no_face = 0
    grayscale = True
    for image_path, label in zip(sample.images, sample.labels, strict=True):
        image = _read(locator, image_path)
        faces = locator.locate(image, "largest", allow_none=True)
        if not faces.detections:
            no_face += 1
            continue
        for crop_label, template in crops_by_template.items():
            crops_of[crop_label].append(
                align_faces(
                    image, [faces.detections[0].landmarks], np.asarray(template, np.float32), size
                )
            )
        grayscale = grayscale and _is_gray(image)
        labels.append(label)
    truth = np.asarray(labels)
    genuine_n = int(sum(np.sum(truth[i + 1 :] == truth[i]) for i in range(len(truth))))
    if genuine_n == 0 or len(set(labels)) < 2:
        raise SampleError(
            f"the sample {sample.description} gives {genuine_n} same-person pairs over "
            f"{len(set(labels))} persons with a detected face: the search needs both same-person "
            "and different-person pairs"
        )
    base = ModelCard(
        name=path.stem,
        task="recognition",
        family="onnx",
        file=path.name,
        preprocessing=Preprocessing(input_size=size, layout=classified.layout),
        embedding_dim=classified.embedding_dim,
    )
    embedder = OnnxEmbedder(base, path, settings, flip=False)
    figures: list[CandidateFigure] = []
    scored: list[tuple[np.ndarray, np.ndarray]] = []
    for crop_label in crops_by_template:
        crops = np.concatenate(crops_of[crop_label])
        for color in ("RGB",) if grayscale else ("RGB", "BGR"):
            for norm_label, mean, std in NORMALISATIONS:
                if color == "RGB" and norm_label == "Caffe means":
                    mean = (mean[2], mean[1], mean[0])  # the Caffe means in R, G, B order
                pre = Preprocessing(input_size=size, color=color, mean=mean, std=std)
                vectors = embedder.with_preprocessing(pre).embed(crops)
                genuine, impostor = _pair_scores(vectors, truth)
                tmr = (
                    operating_point(impostor, genuine, 1e-2)["tmr"]
                    if len(impostor) >= RULE_OF_30 / 1e-2
                    else None
                )
                figures.append(
                    CandidateFigure(
                        f"{color} {norm_label}, {crop_label}",
                        color,
                        mean,
                        std,
                        crop_label,
                        _auc(genuine, impostor),
                        tmr,
                    )
                )
                scored.append((genuine, impostor))
                if progress is not None:
                    progress(figures[-1])
    chosen = int(np.argmax([f.auc for f in figures]))  # the first of equals: list order
    best = figures[chosen].auc
    warnings: list[str] = []
    if grayscale:
        warnings.append(
            "every photo of the sample is grayscale: the colour order cannot be measured "
            "(RGB and BGR give the same input); RGB, the ArcFace convention, is kept"
        )
    others = [f for i, f in enumerate(figures) if i != chosen]
    runner = max(others, key=lambda f: f.auc) if others else None
    if runner is not None and best - runner.auc < 0.002:
        warnings.append(
            f"the best candidate ({figures[chosen].label}, AUC {best:.4f}) is within 0.002 of "
            f"the next ({runner.label}, AUC {runner.auc:.4f}): the sample does not tell them "
            "apart; check the choice with a larger sample"
        )
    if best < 0.9:
        warnings.append(
            f"the best candidate separates same from different people poorly (AUC "
            f"{best:.4f}): the model may need a preprocessing outside the candidates, "
            "another alignment, or it is not a face recognizer"
        )
    genuine, impostor = scored[chosen]
    thresholds, notes = sample_thresholds(genuine, impostor)
    return SearchReport(
        metric="ROC AUC over every same-person / different-person pair of the sample",
        candidates=tuple(figures),
        chosen=chosen,
        images=len(sample.images),
        persons=len(set(labels)),
        no_face=no_face,
        genuine_pairs=int(len(genuine)),
        impostor_pairs=int(len(impostor)),
        seconds=round(time.perf_counter() - start, 2),
        thresholds=thresholds,
        threshold_notes=tuple(notes),
        warnings=tuple(warnings),
        sample=sample.description,
    )


def check_detector(
    detector: Detector, settings: Settings, sample: LabelledSample, limit: int = 100
) -> DetectorCheck:
    """Detect the first ``limit`` photos of the sample: how many have a face, at what score."""
    start = time.perf_counter()
    locator = Pipeline(detector, None, settings)
    scores = []
    images = sample.images[:limit]
    for image_path in images:
        found = locator.detect(_read(locator, image_path))
        if found:
            scores.append(max(d.score for d in found))
    return DetectorCheck(
        len(images),
        len(scores),
        round(float(np.mean(scores)) if scores else 0.0, 4),
        round(time.perf_counter() - start, 2),
    )
