"""facenet-pytorch's own MTCNN, imported from its wheel: the reference the project's
MTCNN detector is checked against (tests) and timed against (``bench/bench_mtcnn.py``).

Only the two modules needed are imported (``models/utils/detect_face.py`` and
``models/mtcnn.py``); torchvision, which they import but which is not installed, is
replaced by a stub holding ``batched_nms`` (greedy IoU NMS per index, as torchvision's,
computed by OpenCV) and an empty ``transforms.functional``, which only face extraction uses.
Needs torch (the ``train`` extra).
"""

from __future__ import annotations

import importlib.util
import sys
import types
import zipfile
from pathlib import Path

import cv2
import numpy as np

from service.convert.mtcnn import WHEEL_MEMBERS

THRESHOLDS = [0.6, 0.7, 0.7]


def load_reference(
    wheel: Path, root: Path, min_face_size: int = 20, threads: int | None = 1
) -> types.SimpleNamespace:
    """``torch``, the three networks (``nets``) and ``detect(bgr) -> (boxes, points)``
    with boxes (N, 5: x1, y1, x2, y2, score) and points (N, 5, 2).

    The wheel is extracted into ``root``. ``detect`` runs torch with ``threads`` intra-op
    threads (``None``: torch's default), restoring the previous count afterwards.
    """
    import torch

    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(root)

    def batched_nms(boxes, scores, idxs, threshold):
        """torchvision's semantics (IoU of (x2-x1)*(y2-y1) areas, per index, highest score
        first) on OpenCV's compiled NMS, so that the reference is not slowed by Python."""
        if boxes.numel() == 0:
            return torch.empty((0,), dtype=torch.int64)
        shifted = (boxes + (idxs.to(boxes) * (boxes.max() + 1))[:, None]).double().numpy()
        xywh = np.concatenate([shifted[:, :2], shifted[:, 2:] - shifted[:, :2]], axis=1)
        keep = np.asarray(
            cv2.dnn.NMSBoxes(xywh.tolist(), scores.double().tolist(), 0.0, float(threshold)),
            dtype=np.int64,
        ).reshape(-1)
        keep = keep[np.argsort(-scores.numpy()[keep], kind="stable")]
        return torch.from_numpy(keep)

    stubs = {
        name: types.ModuleType(name)
        for name in (
            "torchvision",
            "torchvision.transforms",
            "torchvision.transforms.functional",
            "torchvision.ops",
            "torchvision.ops.boxes",
        )
    }
    stubs["torchvision.ops.boxes"].batched_nms = batched_nms
    packages = {
        name: types.ModuleType(name)
        for name in ("facenet_pytorch", "facenet_pytorch.models", "facenet_pytorch.models.utils")
    }
    for package in packages.values():
        package.__path__ = []
    saved = {name: sys.modules.get(name) for name in [*stubs, *packages]}
    sys.modules.update(stubs)
    sys.modules.update(packages)
    try:
        modules = {}
        for name, rel in (
            ("facenet_pytorch.models.utils.detect_face", "models/utils/detect_face.py"),
            ("facenet_pytorch.models.mtcnn", "models/mtcnn.py"),
        ):
            spec = importlib.util.spec_from_file_location(name, root / "facenet_pytorch" / rel)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            modules[name] = module
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    mtcnn = modules["facenet_pytorch.models.mtcnn"]
    nets = {}
    for net, cls in (("pnet", mtcnn.PNet), ("rnet", mtcnn.RNet), ("onet", mtcnn.ONet)):
        model = cls(pretrained=False)
        model.load_state_dict(torch.load(root / WHEEL_MEMBERS[net], weights_only=True))
        nets[net] = model.eval()
    detect_face = modules["facenet_pytorch.models.utils.detect_face"].detect_face

    def detect(bgr: np.ndarray):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads or previous)
        try:
            with torch.no_grad():
                boxes, points = detect_face(
                    cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
                    min_face_size,
                    nets["pnet"],
                    nets["rnet"],
                    nets["onet"],
                    THRESHOLDS,
                    0.709,
                    "cpu",
                )
        finally:
            torch.set_num_threads(previous)
        return np.asarray(boxes[0], np.float64).reshape(-1, 5), np.asarray(points[0], np.float64)

    return types.SimpleNamespace(torch=torch, nets=nets, detect=detect)
