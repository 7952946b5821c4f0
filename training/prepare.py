"""``facegate-train prepare SRC DST``: raw photos → aligned crops, with the service's own stages.

Each image under ``SRC/<identity>/`` is decoded by ``service.pipeline.decode``,
its main face found by the service's detector (``service.pipeline.faces.main_face``:
the largest) and warped by ``Pipeline.locate`` onto the crop contract of a recognizer's
card (``recognizer``: its alignment template and crop size, e.g. ``dlib_resnet_v1``'s
150×150 chip) or, without one, the ArcFace 112×112 template scaled to ``size`` — the
exact path a request takes in the service, so training and serving see the same crops.
Images without a face are skipped and listed in ``DST/dataset.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from training.data import IMAGE_SUFFIXES, write_dataset_info


@dataclass
class PrepareReport:
    images: int = 0
    aligned: int = 0
    no_face: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    identities: int = 0
    seconds: float = 0.0
    detector: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def default_model_dirs(shared: Path | None) -> list[Path]:
    dirs = []
    if shared is not None:
        dirs.append(Path(shared) / "models")
    return dirs


def build_service_detector(detector: str, model_dirs: list[Path], det_size: int | None = None):
    """The service's detector (manifest name or .onnx path), sha256-verified through its
    registry."""
    from service.config import Settings
    from service.pipeline.detectors import build_detector
    from service.registry import Registry

    if det_size:
        settings = Settings(detector=detector, det_size=det_size)
    else:
        settings = Settings(detector=detector)
    registry = Registry(settings.manifest, [*model_dirs, settings.models_dir])
    card, path = registry.resolve(detector, task="detection")
    return build_detector(card, path, settings), settings


def list_images(
    src: Path,
    limit_per_identity: int | None = None,
    identities: list[str] | None = None,
    keys: list[str] | None = None,
) -> list[tuple[str, Path]]:
    """(identity, path) for ``src/<identity>/<image>``, sorted (or exactly ``keys``, "id/file")."""
    if keys is not None:
        return [(key.split("/")[0], src / key) for key in sorted(set(keys))]
    names = (
        identities
        if identities is not None
        else sorted(p.name for p in src.iterdir() if p.is_dir())
    )
    out: list[tuple[str, Path]] = []
    for name in names:
        files = sorted(f for f in (src / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        out.extend((name, f) for f in files[:limit_per_identity])
    return out


def crop_contract(recognizer: str | None, size: int = 112) -> tuple[np.ndarray, tuple[int, int]]:
    """(template, (w, h)) of the crops: the recognizer card's alignment (the manifest's card,
    as the service aligns for it), or the ArcFace template scaled to ``size``."""
    from service.pipeline.align import ARCFACE_TEMPLATE

    if recognizer is None:
        return ARCFACE_TEMPLATE * (size / 112.0), (size, size)
    from service.config import MANIFEST_PATH
    from service.registry import Registry

    registry = Registry(MANIFEST_PATH, [])
    if recognizer not in registry.names("recognition"):
        raise ValueError(
            f"unknown recognizer {recognizer!r}; known: {', '.join(registry.names('recognition'))}"
        )
    card = registry.cards[recognizer]
    if card.alignment is None:
        return ARCFACE_TEMPLATE.copy(), (112, 112)
    width, height = card.alignment.size
    return np.asarray(card.alignment.template, dtype=np.float32), (int(width), int(height))


def prepare(
    src: Path,
    dst: Path,
    detector: str = "yunet_2023mar",
    model_dirs: Sequence[Path] = (),
    size: int = 112,
    workers: int = 1,
    limit_per_identity: int | None = None,
    identities: list[str] | None = None,
    keys: list[str] | None = None,
    progress: bool = True,
    recognizer: str | None = None,
) -> PrepareReport:
    """Align every face photo of ``src`` into ``dst`` (PNG, lossless); see the module docstring."""
    from service.pipeline.errors import NoFace, PipelineError
    from service.pipeline.pipeline import Pipeline

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source directory not found: {src}")
    if src.resolve() == dst.resolve():
        raise ValueError("DST must differ from SRC")
    det, settings = build_service_detector(detector, list(model_dirs))
    template, crop_size = crop_contract(recognizer, size)
    faces = Pipeline(det, None, settings, template=template, crop_size=crop_size)
    items = list_images(src, limit_per_identity, identities, keys)
    report = PrepareReport(images=len(items), detector=det.card.name)
    start = time.perf_counter()

    def one(item: tuple[str, Path]) -> tuple[str, str | None]:
        identity, path = item
        rel = f"{identity}/{path.name}"
        try:
            crop = faces.locate(path.read_bytes(), "largest").crops[0]
        except NoFace:
            return rel, "no_face"
        except (OSError, PipelineError):  # a bad file is reported, not fatal
            return rel, "unreadable"
        out = dst / identity / (path.stem + ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), crop)
        return rel, None

    iterator = ThreadPoolExecutor(workers).map(one, items) if workers > 1 else map(one, items)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(items), desc="prepare", unit="img")
    dst.mkdir(parents=True, exist_ok=True)
    seen = set()
    for rel, problem in iterator:
        if problem == "no_face":
            report.no_face.append(rel)
        elif problem == "unreadable":
            report.unreadable.append(rel)
        else:
            report.aligned += 1
            seen.add(rel.split("/")[0])
    report.identities = len(seen)
    report.seconds = round(time.perf_counter() - start, 2)
    write_dataset_info(
        dst,
        {
            "source": str(src),
            "size": list(crop_size),
            "recognizer": recognizer,
            "template": (np.asarray(template)).round(4).tolist(),
            **report.as_dict(),
        },
    )
    return report
