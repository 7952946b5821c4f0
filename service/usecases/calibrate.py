"""Deployment calibration: thresholds at FMR 1e-2 ... 1e-6 from the operator's own photos.

Photos (one sub-folder per person) go through the served pipeline exactly as ``/v1/verify``
sees them: the same detector, the main-face rule (the largest face) and the alignment; a
photo in which no face is found, or that cannot be decoded, is left out and listed. A
``pairs.txt`` (LFW format) is read through :func:`service.usecases.eval_pairs.pair_file_scores`,
the implementation ``facegate eval-pairs`` uses, so the two agree threshold for threshold.
The maths (blocks, exact tail, rule of 30, bootstrap over persons) is
:mod:`service.pipeline.calibration`'s.

The result is written beside the card in the models directory as
``<model>.calibration.json`` (:class:`service.registry.DeploymentCalibration`), bound to the
model file's sha256; the service then uses its thresholds (``/v1/info`` says so).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.files import atomic_write
from service.pipeline.calibration import (
    CALIBRATION_POINTS,
    REPLICATES,
    OperatingPoints,
    Scores,
    operating_points,
    tally,
)
from service.pipeline.errors import PipelineError
from service.registry import CALIBRATION_SUFFIX, DeploymentCalibration

#: Photo files a person's folder may hold (as ``facegate gallery import`` reads).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
#: Photos decoded and detected per batch (their faces embedded in one call).
BATCH = 16


class CalibrationError(ValueError):
    """The photos or pairs cannot give a calibration (with a code for the command's answer)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Refused:
    path: str
    code: str
    message: str


@dataclass(frozen=True)
class CalibrationResult:
    model: str
    model_sha256: str
    model_id: str
    detector: str
    flip: bool
    #: kind ("photos" / "pairs"), path, persons, photos, genuine_pairs, impostor_pairs
    source: dict
    points: OperatingPoints
    scores: Scores
    #: The scored photos, in the rows of ``scores`` (paths), and their persons.
    photos: tuple[Path, ...]
    persons: tuple[str, ...]
    refused: tuple[Refused, ...] = ()
    seconds: dict = field(default_factory=dict)

    def record(self, created_at: str | None = None) -> DeploymentCalibration:
        """The calibration file's content."""
        thresholds = self.points.thresholds()
        return DeploymentCalibration(
            model=self.model,
            model_sha256=self.model_sha256,
            created_at=created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            source=self.source,
            detector=self.detector,
            flip=self.flip,
            thresholds=thresholds,
            default_operating_point=None,
            operating_points={p.name: p.to_dict() for p in self.points.points},
            unsupported={u.name: u.to_dict() for u in self.points.unsupported},
        )

    def to_dict(self) -> dict:
        boot = self.points.bootstrap
        return {
            "model": self.model,
            "model_id": self.model_id,
            "detector": self.detector,
            "flip": self.flip,
            **self.source,
            "operating_points": {p.name: p.to_dict() for p in self.points.points},
            "unsupported": {u.name: u.to_dict() for u in self.points.unsupported},
            "bootstrap": (
                {"replicates": boot.replicates, "seed": boot.seed, "truncated": boot.truncated}
                if boot
                else None
            ),
            "refused": len(self.refused),
            "seconds": self.seconds,
        }


def photo_folder(directory: Path) -> list[tuple[str, Path]]:
    """(person, photo) for every photo of ``directory/<person>/``, in name order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CalibrationError("not_a_directory", f"{directory} is not a directory")
    photos = [
        (person.name, path)
        for person in sorted(p for p in directory.iterdir() if p.is_dir())
        for path in sorted(person.iterdir())
        if path.is_file() and path.suffix.lower() in PHOTO_SUFFIXES
    ]
    if len({person for person, _ in photos}) < 2:
        raise CalibrationError(
            "too_few_persons",
            f"{directory} must hold one sub-folder of photos per person, at least two persons "
            f"({', '.join(PHOTO_SUFFIXES)})",
        )
    return photos


def embed_photos(
    pipeline, paths: list[Path], batch: int = BATCH
) -> tuple[np.ndarray, list[int], list[Refused]]:
    """Embeddings of each photo's main face (as ``/v1/verify`` picks it), the indices of the
    photos that gave one, and the refused photos with the pipeline's reason."""
    vectors: list[np.ndarray] = []
    kept: list[int] = []
    refused: list[Refused] = []
    for start in range(0, len(paths), batch):
        chunk = list(range(start, min(len(paths), start + batch)))
        sources: list[bytes] = []
        readable: list[int] = []
        for i in chunk:
            try:
                sources.append(paths[i].read_bytes())
                readable.append(i)
            except OSError as exc:
                refused.append(Refused(str(paths[i]), "unreadable", str(exc.strerror or exc)))
        found = pipeline.locate_batch(sources, "largest") if sources else []
        faces = []
        for i, result in zip(readable, found, strict=True):
            if isinstance(result, PipelineError):
                refused.append(Refused(str(paths[i]), result.code, str(result)))
            else:
                faces.append(result)
                kept.append(i)
        if faces:
            vectors.append(pipeline.embed(np.concatenate([f.crops for f in faces])))
    dim = pipeline.dim
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), kept, refused


def _result(pipeline, source: dict, scores: Scores, photos, persons, refused, seconds, **kw):
    start = time.perf_counter()
    points = operating_points(scores, CALIBRATION_POINTS, **kw)
    seconds = {**seconds, "bootstrap": round(time.perf_counter() - start, 2)}
    card = pipeline.recognizer_card
    return CalibrationResult(
        model=card.name,
        model_sha256=str(card.sha256),
        model_id=card.id,
        detector=pipeline.detector_card.id,
        flip=bool(getattr(pipeline.embedder, "flip", False)),
        source={
            **source,
            "persons": scores.persons,
            "photos": len(photos),
            "genuine_pairs": int(scores.genuine.size),
            "impostor_pairs": int(scores.impostors),
        },
        points=points,
        scores=scores,
        photos=tuple(photos),
        persons=tuple(persons),
        refused=tuple(refused),
        seconds=seconds,
    )


def calibrate_photos(
    pipeline,
    directory: Path,
    *,
    replicates: int = REPLICATES,
    seed: int = 0,
    batch: int = BATCH,
) -> CalibrationResult:
    """Calibrate on ``directory/<person>/<photo>`` (module docstring)."""
    listed = photo_folder(directory)
    paths = [path for _, path in listed]
    start = time.perf_counter()
    embeddings, kept, refused = embed_photos(pipeline, paths, batch)
    embedded = time.perf_counter()
    persons = [listed[i][0] for i in kept]
    if len(set(persons)) < 2:
        raise CalibrationError(
            "too_few_persons", f"faces were found in the photos of {len(set(persons))} person(s)"
        )
    scores = tally(embeddings, persons)
    seconds = {
        "embed": round(embedded - start, 2),
        "pairs": round(time.perf_counter() - embedded, 2),
    }
    return _result(
        pipeline,
        {"kind": "photos", "path": str(Path(directory).resolve())},
        scores,
        [paths[i] for i in kept],
        persons,
        refused,
        seconds,
        replicates=replicates,
        seed=seed,
    )


def calibrate_pairs(
    pipeline,
    pairs_path: Path,
    images_dir: Path,
    *,
    replicates: int = REPLICATES,
    seed: int = 0,
    workers: int = 1,
) -> CalibrationResult:
    """Calibrate on an LFW-format ``pairs.txt``: genuine pairs are the listed same-person
    pairs, impostors every pair of its images of two different persons (as ``eval-pairs``)."""
    from service.usecases.eval_pairs import pair_file_scores

    try:
        scored = pair_file_scores(pipeline, Path(pairs_path), Path(images_dir), workers=workers)
    except (OSError, ValueError) as exc:
        raise CalibrationError("invalid_pairs", str(exc)) from None
    start = time.perf_counter()
    return _result(
        pipeline,
        {
            "kind": "pairs",
            "path": str(Path(pairs_path).resolve()),
            "no_face": int(sum(scored.fallback)),
        },
        scored.scores,
        [Path(images_dir) / k for k in scored.keys],
        [k.split("/")[0] for k in scored.keys],
        [],
        {"embed": round(scored.seconds, 2), "pairs": round(time.perf_counter() - start, 2)},
        replicates=replicates,
        seed=seed,
    )


def calibration_file(models_dir: Path, model: str) -> Path:
    return Path(models_dir) / f"{model}{CALIBRATION_SUFFIX}"


def write_calibration(result: CalibrationResult, models_dir: Path, default_point: str | None):
    """Write the deployment calibration beside the card (atomically); returns its path.

    ``default_point``: the card's default operating point, kept when the calibration supports
    it (else the strictest supported point). Refused (CalibrationError) when the pairs
    support no operating point at all.
    """
    record = result.record()
    if not record.thresholds:
        needs = ", ".join(
            f"{u.name}: {u.photos_needed} photos" for u in result.points.unsupported[:1]
        )
        raise CalibrationError(
            "too_few_pairs",
            f"{result.source['impostor_pairs']} impostor pairs support no operating point "
            f"under the rule of 30 ({needs}, at the same photos per person); nothing written",
        )
    points = record.thresholds
    record.default_operating_point = (
        default_point if default_point in points else max(points, key=lambda p: points[p])
    )
    path = calibration_file(models_dir, result.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record.model_dump(mode="json"), indent=2) + "\n")
    return path
