"""What an ONNX file is, read from its graph: a face detector of a known family, a face
recognizer, or something the pipeline cannot serve (and why).

The routing follows ``insightface.model_zoo.model_zoo.ModelRouter.get_model`` (the rules an
InsightFace model pack is sorted by), extended to the detector families the service decodes
(``service.pipeline.detectors``):

- five outputs or more: a detector (InsightFace's rule). 9 outputs (score/bbox/kps at strides
  8, 16, 32, last dims 1/4/10): **SCRFD** with keypoints, InsightFace's RetinaFace exports
  included (same layout, same decoder). 12 outputs (cls/obj/bbox/kps, last dims 1/1/4/10):
  **YuNet**. 6 outputs (SCRFD without keypoints) and 10/15 (five strides) are refused: the
  pipeline needs five landmarks at strides 8/16/32.
- three outputs whose last dims are 4, 2 and 10 (loc/conf/landmarks over priors): the
  **RetinaFace** PyTorch export (``Pytorch_Retinaface``).
- one image input of 192×192: a landmark model (InsightFace's ``2d106det``, ``1k3d68``);
  96×96: an attribute model (``genderage``); two inputs: a face swapper. Skipped in a pack.
- otherwise one ``N×3×H×W`` (or ``N×H×W×3``) input with fixed H, W and one output of
  ``D`` values per image: a **recognizer** with a ``D``-dimensional embedding, unless its
  output comes out of a Softmax/Sigmoid/ArgMax/TopK (class scores: a classifier) or ``D``
  is too small to be an embedding.

A symbolic embedding size is resolved by running the model once on zeros; a symbolic crop
size cannot be (nothing says which size the weights were trained at) and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

Kind = Literal["detection", "recognition", "landmark", "attribute", "swapper"]

#: Ops whose output is class scores, not an embedding.
CLASS_SCORE_OPS = {"Softmax", "LogSoftmax", "Sigmoid", "ArgMax", "TopK", "Hardmax"}
#: Fewest values an embedding has (face embeddings are 128-d to 512-d; 64 leaves room).
MIN_EMBEDDING_DIM = 64


class ClassifyError(ValueError):
    """The file is not an ONNX model the pipeline can serve; the message says why."""


@dataclass(frozen=True)
class Classified:
    """What one ONNX file is."""

    path: Path
    kind: Kind
    #: detector decoder (scrfd, yunet, retinaface) or, for a recognizer, ``onnx``
    family: str
    reason: str
    input_shape: tuple[int | str, ...]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    #: (width, height) of a fixed input; None: dynamic (detectors only)
    input_size: tuple[int, int] | None = None
    embedding_dim: int | None = None
    #: batch size a fixed-batch export needs (None: dynamic)
    fixed_batch: int | None = None

    @property
    def servable(self) -> bool:
        return self.kind in ("detection", "recognition")


def _dims(shape: list) -> tuple[int | str, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else str(d) for d in shape)


def _last(shape: tuple[int | str, ...]) -> int | str | None:
    return shape[-1] if shape else None


def load_graph(path: Path) -> onnx.ModelProto:
    """The parsed model, or ClassifyError when the bytes are not an ONNX model."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, and whatever protobuf raises on garbage
        raise ClassifyError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node or not model.graph.output:
        raise ClassifyError(f"{path}: not an ONNX model (no graph: no nodes or no outputs)")
    return model


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ClassifyError(f"{path}: ONNX Runtime cannot load it: {exc}") from None


def _producers(model: onnx.ModelProto) -> dict[str, str]:
    return {out: node.op_type for node in model.graph.node for out in node.output}


def _detector(path: Path, shapes: list[tuple[int | str, ...]], names: list[str]) -> Classified:
    lasts = [_last(s) for s in shapes]
    n = len(shapes)
    if n == 12 and lasts == [1] * 3 + [1] * 3 + [4] * 3 + [10] * 3:
        return Classified(path, "detection", "yunet", "12 outputs cls/obj/bbox/kps", ())
    if n == 12 and {f"{k}_{s}" for k in ("cls", "obj", "bbox", "kps") for s in (8, 16, 32)} <= set(
        names
    ):
        return Classified(path, "detection", "yunet", "12 outputs named cls/obj/bbox/kps_8..32", ())
    if n == 9 and lasts == [1] * 3 + [4] * 3 + [10] * 3:
        return Classified(
            path, "detection", "scrfd", "9 outputs score/bbox/kps at strides 8/16/32", ()
        )
    if n == 6 and lasts == [1] * 3 + [4] * 3:
        raise ClassifyError(
            f"{path}: an SCRFD-style detector without keypoints (6 outputs): the pipeline "
            "aligns faces on five landmarks; use a *_kps / *_bnkps export"
        )
    if n in (10, 15):
        raise ClassifyError(
            f"{path}: an SCRFD-style detector with five strides ({n} outputs); the served "
            "decoder handles strides 8/16/32 (9 outputs)"
        )
    raise ClassifyError(
        f"{path}: {n} outputs (last dims {lasts}) match no detector family the pipeline "
        "decodes (SCRFD: 9, YuNet: 12, RetinaFace: 3)"
    )


def classify(path: Path | str) -> Classified:
    """Classify one file (see the module docstring); ClassifyError says why it cannot serve."""
    path = Path(path)
    model = load_graph(path)
    session = _session(path)
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    out_shapes = [_dims(o.shape) for o in outputs]
    out_names = [o.name for o in outputs]
    in_shape = _dims(inputs[0].shape) if inputs else ()

    if len(outputs) >= 5:
        found = _detector(path, out_shapes, out_names)
    elif len(outputs) == 3 and [_last(s) for s in out_shapes] == [4, 2, 10]:
        found = Classified(
            path, "detection", "retinaface", "3 outputs loc/conf/landmarks over priors", ()
        )
    else:
        found = None
    if found is not None:
        if len(in_shape) != 4 or in_shape[1] != 3:
            raise ClassifyError(f"{path}: detector input {in_shape} is not N×3×H×W")
        size = (
            (int(in_shape[3]), int(in_shape[2]))
            if isinstance(in_shape[2], int) and isinstance(in_shape[3], int)
            else None
        )
        batch = in_shape[0] if isinstance(in_shape[0], int) else None
        return Classified(
            path, "detection", found.family, found.reason, in_shape, "NCHW", size, None, batch
        )

    if len(in_shape) != 4:
        raise ClassifyError(
            f"{path}: input {inputs[0].name if inputs else '?'} has shape {in_shape}: not an "
            "image batch (N×3×H×W), so neither a face detector nor a face recognizer"
        )
    if in_shape[1] == 3:
        layout: Literal["NCHW", "NHWC"] = "NCHW"
        height, width = in_shape[2], in_shape[3]
    elif in_shape[3] == 3:
        layout = "NHWC"
        height, width = in_shape[1], in_shape[2]
    else:
        raise ClassifyError(f"{path}: input shape {in_shape} has no 3-channel (colour) axis")
    if height == 192 and width == 192:
        return Classified(
            path, "landmark", "insightface", "192×192 input: a landmark model", in_shape, layout
        )
    if height == 96 and width == 96:
        return Classified(
            path, "attribute", "insightface", "96×96 input: an attribute model", in_shape, layout
        )
    if len(inputs) == 2:
        return Classified(
            path, "swapper", "insightface", "two inputs: a face swapper", in_shape, layout
        )
    if not (isinstance(height, int) and isinstance(width, int)):
        raise ClassifyError(
            f"{path}: the input's height and width are symbolic ({in_shape}): the crop size the "
            "recognizer was trained at cannot be resolved from the graph; export it with a "
            "fixed input size"
        )
    if len(outputs) != 1:
        raise ClassifyError(
            f"{path}: {len(outputs)} outputs ({', '.join(out_names)}): a recognizer has one "
            "embedding output"
        )
    op = _producers(model).get(out_names[0])
    if op in CLASS_SCORE_OPS:
        raise ClassifyError(
            f"{path}: its output {out_names[0]!r} comes out of a {op}: class scores (a "
            "classifier), not a face embedding"
        )
    batch = in_shape[0] if isinstance(in_shape[0], int) else None
    dim = _embedding_dim(path, session, out_shapes[0], batch)
    if dim < MIN_EMBEDDING_DIM:
        raise ClassifyError(
            f"{path}: {dim} output values per image: too few for a face embedding (at least "
            f"{MIN_EMBEDDING_DIM}); an attribute model or a classifier?"
        )
    return Classified(
        path,
        "recognition",
        "onnx",
        f"one {layout} image input, one {dim}-value output",
        in_shape,
        layout,
        (int(width), int(height)),
        dim,
        batch,
    )


def _embedding_dim(
    path: Path, session: ort.InferenceSession, shape: tuple[int | str, ...], batch: int | None
) -> int:
    """Values per image of the output: from the graph, else by running zeros once."""
    per_image = shape[1:]
    if per_image and all(isinstance(d, int) for d in per_image):
        return int(np.prod([int(d) for d in per_image]))
    inp = session.get_inputs()[0]
    concrete = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    try:
        out = session.run(None, {inp.name: np.zeros(concrete, np.float32)})[0]
    except Exception as exc:
        raise ClassifyError(
            f"{path}: the embedding size is symbolic ({shape}) and a trial run failed: {exc}"
        ) from None
    return int(np.prod(out.shape[1:])) if out.ndim > 1 else int(out.size // max(1, batch or 1))
