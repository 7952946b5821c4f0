"""Convert dlib's ResNet face-recognition network (``dlib_face_recognition_resnet_model_v1.dat``)
into an ONNX model, without dlib or torch.

The ``.dat`` file is dlib's own serialisation of a ``loss_metric`` network:

* integers are variable-length: one header byte (low nibble = number of
  payload bytes, bit 7 = negative) followed by the magnitude, little-endian;
* strings are an integer length followed by the bytes;
* scalar floats are a (mantissa: int64, exponent: int16) pair of such
  integers, value = mantissa * 2**exponent;
* tensors are ``version=2, num_samples, k, nr, nc`` then raw little-endian
  float32 values; alias tensors are ``version=1, num_samples, k, nr, nc``;
* a network is written outside-in: each layer writes its version number and
  then its sub-network, and only after the sub-network its own details.  The
  stream therefore starts with the chain of versions of every layer (loss
  first), then the input layer, then each layer's details from the input
  upwards.

The file does not record the topology (tag/skip layers carry nothing but a
version), so the network is defined here, layer by layer, as the published
``anet_type`` of ``dlib_face_recognition_resnet_model_v1``; the parser walks
that definition and checks every layer name, hyper-parameter and tensor shape
it reads against it, then rebuilds the same computation with ``onnx.helper``.

The ONNX model takes ``(N, 3, 150, 150)`` float32 RGB already normalised the
way dlib's ``input_rgb_image_sized<150>`` does (``(x - channel_mean) / 256``,
the means are read from the file and returned in :class:`DlibNetwork`) and
returns the 128-d descriptor (not L2-normalised).  The bytes are deterministic
(fixed IR version, opset, producer and node names), so the converted file's
sha256 can be recorded in the model card.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from service.convert.onnx_graph import CountedGraph
from service.files import atomic_write

INPUT_SIZE = 150
EMBEDDING_DIM = 128
IR_VERSION = 8
OPSET = 17
PRODUCER = "facegate.convert.dlib_resnet"
PRODUCER_VERSION = "1"

# dlib's float_details marks non-finite values with these exponents.
_EXP_INF, _EXP_NINF, _EXP_NAN = 32000, 32001, 32002


class DlibFormatError(ValueError):
    """The file is not the dlib network this converter knows, or it is corrupt."""


# --------------------------------------------------------------------------------------
# The byte stream


class DlibReader:
    """Reads dlib's serialisation primitives from an in-memory buffer."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"unexpected end of file at byte {self.pos} (wanted {n} bytes)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        header = self._take(1)[0]
        size = header & 0x0F
        if size > 8 or header & 0x70:
            raise DlibFormatError(f"bad integer header 0x{header:02x} at byte {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little") if size else 0
        return -value if header & 0x80 else value

    def float(self) -> float:
        mantissa = self.int()
        exponent = self.int()
        if exponent == _EXP_INF:
            return float("inf")
        if exponent == _EXP_NINF:
            return float("-inf")
        if exponent == _EXP_NAN:
            return float("nan")
        return float(np.ldexp(np.float64(mantissa), exponent))

    def string(self) -> str:
        length = self.int()
        if not 0 <= length < 1 << 16:
            raise DlibFormatError(f"implausible string length {length} at byte {self.pos}")
        return bytes(self._take(length)).decode("ascii", errors="replace")

    def bool(self) -> bool:
        char = bytes(self._take(1))
        if char not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool {char!r} at byte {self.pos - 1}")
        return char == b"1"

    # the methods int/float/bool shadow the builtins in this class body's annotations
    def expect_int(self, expected: builtins.int, what: str) -> None:
        found = self.int()
        if found != expected:
            raise DlibFormatError(f"{what}: expected {expected}, found {found} (byte {self.pos})")

    def expect_string(self, expected: str) -> None:
        found = self.string()
        if found != expected:
            raise DlibFormatError(f"expected layer {expected!r}, found {found!r} (byte {self.pos})")

    def tensor(self) -> np.ndarray:
        """A ``resizable_tensor``: returns float32 of shape (num_samples, k, nr, nc)."""
        self.expect_int(2, "tensor version")
        shape = tuple(self.int() for _ in range(4))
        if any(d < 0 for d in shape):
            raise DlibFormatError(f"negative tensor shape {shape} at byte {self.pos}")
        count = int(np.prod(shape))
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias_tensor(self) -> tuple[builtins.int, builtins.int, builtins.int, builtins.int]:
        self.expect_int(1, "alias_tensor version")
        return self.int(), self.int(), self.int(), self.int()


# --------------------------------------------------------------------------------------
# The network definition (input to output)


@dataclass(frozen=True)
class Op:
    """One dlib layer; ``kind`` is con/affine/relu/max_pool/avg_pool/fc/add_prev/tag/skip."""

    kind: str
    filters: int = 0  # con: number of filters; fc: outputs
    window: int = 0  # con / pool: kernel side (0 = whole input for avg_pool_everything)
    stride: int = 1
    tag: int = 0  # tag / skip / add_prev: tag id

    @property
    def has_details(self) -> bool:
        return self.kind not in ("tag", "skip")


def _block(filters: int, stride: int) -> list[Op]:
    """dlib: ``affine<con<N,3,3,1,1,relu<affine<con<N,3,3,stride,stride,SUBNET>>>>>``."""
    return [
        Op("con", filters, 3, stride),
        Op("affine"),
        Op("relu"),
        Op("con", filters, 3, 1),
        Op("affine"),
    ]


def _ares(filters: int) -> list[Op]:
    """``relu<add_prev1<block<N,affine,1,tag1<SUBNET>>>>``."""
    return [Op("tag", tag=1), *_block(filters, 1), Op("add_prev", tag=1), Op("relu")]


def _ares_down(filters: int) -> list[Op]:
    """``relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,affine,2,tag1<SUBNET>>>>>>>``."""
    return [
        Op("tag", tag=1),
        *_block(filters, 2),
        Op("tag", tag=2),
        Op("skip", tag=1),
        Op("avg_pool", window=2, stride=2),
        Op("add_prev", tag=2),
        Op("relu"),
    ]


def face_recognition_resnet_v1() -> list[Op]:
    """The layers of ``dlib_face_recognition_resnet_model_v1`` from input to descriptor."""
    ops = [Op("con", 32, 7, 2), Op("affine"), Op("relu"), Op("max_pool", window=3, stride=2)]
    ops += _ares(32) * 3  # alevel4
    ops += _ares_down(64) + _ares(64) * 3  # alevel3
    ops += _ares_down(128) + _ares(128) * 2  # alevel2
    ops += _ares_down(256) + _ares(256) * 2  # alevel1
    ops += _ares_down(256)  # alevel0
    ops += [Op("avg_pool", window=0, stride=1), Op("fc", EMBEDDING_DIM)]
    return ops


# --------------------------------------------------------------------------------------
# Parsing


@dataclass
class DlibNetwork:
    """Parsed weights of the network, in the order of :func:`face_recognition_resnet_v1`."""

    ops: list[Op]
    params: list[dict[str, np.ndarray]]  # one dict per op (empty for parameterless ops)
    channel_means: tuple[float, float, float]  # red, green, blue averages of the input layer
    input_size: int
    loss: dict[str, float] = field(default_factory=dict)


def _read_layer_tail(reader: DlibReader, first: bool) -> None:
    """What ``add_layer`` writes after a layer's details (flags and cached buffers).

    The first layer's ``add_layer`` (version 3, the one holding the input layer)
    also records the input's sample expansion factor.
    """
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, output disabled
        reader.bool()
    for _ in range(3):  # x_grad, cached_output, params_grad / grad_final
        reader.tensor()
    if first:
        reader.expect_int(1, "sample expansion factor")


def _read_details(reader: DlibReader, op: Op, channels: int) -> tuple[dict, int]:
    """Read one layer's details; returns its parameters and the output channel count."""
    if op.kind == "con":
        reader.expect_string("con_4")
        params = reader.tensor().reshape(-1)
        reader.expect_int(op.filters, "con num_filters")
        reader.expect_int(op.window, "con nr")
        reader.expect_int(op.window, "con nc")
        reader.expect_int(op.stride, "con stride_y")
        reader.expect_int(op.stride, "con stride_x")
        pad = 0 if op.stride != 1 else op.window // 2
        reader.expect_int(pad, "con padding_y")
        reader.expect_int(pad, "con padding_x")
        fshape = reader.alias_tensor()
        bshape = reader.alias_tensor()
        if fshape != (op.filters, channels, op.window, op.window) or bshape != (
            1,
            op.filters,
            1,
            1,
        ):
            raise DlibFormatError(f"con: unexpected filter/bias shapes {fshape} {bshape}")
        for _ in range(4):  # learning-rate / weight-decay multipliers
            reader.float()
        nweights = int(np.prod(fshape))
        if params.size != nweights + op.filters:
            raise DlibFormatError(
                f"con: {params.size} parameters, expected {nweights + op.filters}"
            )
        return {
            "weight": params[:nweights].reshape(fshape),
            "bias": params[nweights:].copy(),
        }, op.filters
    if op.kind == "affine":
        reader.expect_string("affine_")
        params = reader.tensor().reshape(-1)
        gshape = reader.alias_tensor()
        bshape = reader.alias_tensor()
        mode = reader.int()
        if mode != 0 or gshape != (1, channels, 1, 1) or bshape != gshape:  # 0 = CONV_MODE
            raise DlibFormatError(f"affine: unexpected mode {mode} or shapes {gshape} {bshape}")
        if params.size != 2 * channels:
            raise DlibFormatError(f"affine: {params.size} parameters for {channels} channels")
        return {"gamma": params[:channels].copy(), "beta": params[channels:].copy()}, channels
    if op.kind == "relu":
        reader.expect_string("relu_")
        return {}, channels
    if op.kind in ("max_pool", "avg_pool"):
        reader.expect_string(f"{op.kind}_2")
        reader.expect_int(op.window, f"{op.kind} nr")
        reader.expect_int(op.window, f"{op.kind} nc")
        reader.expect_int(op.stride, f"{op.kind} stride_y")
        reader.expect_int(op.stride, f"{op.kind} stride_x")
        pad = 0 if op.stride != 1 else op.window // 2
        reader.expect_int(pad, f"{op.kind} padding_y")
        reader.expect_int(pad, f"{op.kind} padding_x")
        return {}, channels
    if op.kind == "add_prev":
        reader.expect_string("add_prev_")
        return {}, channels
    if op.kind == "fc":
        reader.expect_string("fc_2")
        reader.expect_int(op.filters, "fc num_outputs")
        reader.expect_int(channels, "fc num_inputs")
        params = reader.tensor().reshape(-1)
        wshape = reader.alias_tensor()
        reader.alias_tensor()  # biases (empty for fc_no_bias)
        bias_mode = reader.int()
        for _ in range(4):
            reader.float()
        if bias_mode != 1 or wshape != (channels, op.filters, 1, 1):  # 1 = FC_NO_BIAS
            raise DlibFormatError(f"fc: unexpected bias mode {bias_mode} or shape {wshape}")
        if params.size != channels * op.filters:
            raise DlibFormatError(f"fc: {params.size} parameters, expected {channels * op.filters}")
        return {"weight": params.reshape(channels, op.filters)}, op.filters
    raise DlibFormatError(f"no details reader for layer kind {op.kind!r}")


def parse_dlib_network(data: bytes, ops: list[Op] | None = None) -> DlibNetwork:
    """Parse the serialised ``loss_metric`` network in ``data`` following ``ops``."""
    ops = ops or face_recognition_resnet_v1()
    reader = DlibReader(data)
    # add_loss_layer: version, loss details, then the sub-network.
    reader.expect_int(1, "add_loss_layer version")
    reader.expect_string("loss_metric_2")
    loss = {"margin": reader.float(), "distance_threshold": reader.float()}
    # The chain of versions of every layer, outermost first; the first layer's
    # add_layer (the one holding the input layer) has its own version number.
    if not ops or not ops[0].has_details:
        raise DlibFormatError("the network must start with a layer that has details")
    for op in reversed(ops[1:]):
        reader.expect_int(2 if op.has_details else 1, f"{op.kind} layer version")
    reader.expect_int(3, "input add_layer version")
    reader.expect_string("input_rgb_image_sized")
    means = (reader.float(), reader.float(), reader.float())
    reader.expect_int(INPUT_SIZE, "input rows")
    reader.expect_int(INPUT_SIZE, "input columns")

    channels = 3
    params: list[dict[str, np.ndarray]] = []
    for index, op in enumerate(ops):
        if not op.has_details:
            params.append({})
            continue
        try:
            layer_params, channels = _read_details(reader, op, channels)
        except DlibFormatError as exc:
            raise DlibFormatError(f"layer {index} ({op.kind}): {exc}") from None
        _read_layer_tail(reader, first=index == 0)
        params.append(layer_params)
    if reader.pos != len(reader.data):
        raise DlibFormatError(f"{len(reader.data) - reader.pos} unexpected trailing bytes")
    for layer in params:
        for name, array in layer.items():
            if not np.all(np.isfinite(array)):
                raise DlibFormatError(f"non-finite values in a layer's {name}")
    return DlibNetwork(
        ops=ops, params=params, channel_means=means, input_size=INPUT_SIZE, loss=loss
    )


# --------------------------------------------------------------------------------------
# ONNX graph


def _out_side(side: int, window: int, stride: int, pad: int) -> int:
    return 1 + (side + 2 * pad - window) // stride


def build_onnx(net: DlibNetwork, fold_affine: bool = True) -> onnx.ModelProto:
    """The ONNX equivalent of ``net``: input ``input`` (N,3,150,150) -> ``embedding`` (N,128).

    With ``fold_affine`` each ``affine`` layer (a frozen batch norm) is folded
    into the convolution right below it, as dlib's own inference computes the
    same ``gamma * (W*x + b) + beta``.
    """
    g = CountedGraph()
    current = "input"
    shape: tuple[int, ...] = (3, net.input_size, net.input_size)  # (C, H, W) of `current`
    tags: dict[int, tuple[str, tuple[int, ...]]] = {}
    ops, params = net.ops, net.params
    index = 0
    while index < len(ops):
        op, p = ops[index], params[index]
        if op.kind == "con":
            weight, bias = p["weight"].astype(np.float32), p["bias"].astype(np.float32)
            nxt = ops[index + 1] if index + 1 < len(ops) else None
            if fold_affine and nxt is not None and nxt.kind == "affine":
                gamma = params[index + 1]["gamma"].astype(np.float64)
                beta = params[index + 1]["beta"].astype(np.float64)
                weight = (weight.astype(np.float64) * gamma[:, None, None, None]).astype(np.float32)
                bias = (bias.astype(np.float64) * gamma + beta).astype(np.float32)
                index += 1
            pad = 0 if op.stride != 1 else op.window // 2
            current = g.node(
                "Conv",
                [current, g.const("conv_w", weight), g.const("conv_b", bias)],
                "conv",
                kernel_shape=[op.window, op.window],
                strides=[op.stride, op.stride],
                pads=[pad] * 4,
            )
            side = _out_side(shape[1], op.window, op.stride, pad)
            shape = (op.filters, side, side)
        elif op.kind == "affine":
            gamma = p["gamma"].reshape(1, -1, 1, 1).astype(np.float32)
            beta = p["beta"].reshape(1, -1, 1, 1).astype(np.float32)
            scaled = g.node("Mul", [current, g.const("affine_gamma", gamma)], "affine_mul")
            current = g.node("Add", [scaled, g.const("affine_beta", beta)], "affine_add")
        elif op.kind == "relu":
            current = g.node("Relu", [current], "relu")
        elif op.kind in ("max_pool", "avg_pool") and op.window > 0:
            pad = 0 if op.stride != 1 else op.window // 2
            current = g.node(
                "MaxPool" if op.kind == "max_pool" else "AveragePool",
                [current],
                op.kind,
                kernel_shape=[op.window, op.window],
                strides=[op.stride, op.stride],
                pads=[pad] * 4,
            )
            side = _out_side(shape[1], op.window, op.stride, pad)
            shape = (shape[0], side, side)
        elif op.kind == "avg_pool":  # avg_pool_everything
            pooled = g.node("GlobalAveragePool", [current], "global_pool")
            current = g.node("Flatten", [pooled], "flatten", axis=1)
            shape = (shape[0], 1, 1)
        elif op.kind == "tag":
            tags[op.tag] = (current, shape)
        elif op.kind == "skip":
            current, shape = tags[op.tag]
        elif op.kind == "add_prev":
            # dlib adds tensors of different sizes by treating what lies outside the
            # smaller one as zero: pad both to the larger shape at the far end.
            other, other_shape = tags[op.tag]
            target = tuple(max(a, b) for a, b in zip(shape, other_shape, strict=True))
            terms = []
            for name, sh in ((current, shape), (other, other_shape)):
                if sh != target:
                    pads = np.array(
                        [0, 0, 0, 0, 0, target[0] - sh[0], target[1] - sh[1], target[2] - sh[2]],
                        dtype=np.int64,
                    )
                    name = g.node("Pad", [name, g.const("pads", pads)], "pad", mode="constant")
                terms.append(name)
            current = g.node("Add", terms, "add_prev")
            shape = target
        elif op.kind == "fc":
            current = g.node(
                "MatMul", [current, g.const("fc_w", p["weight"].astype(np.float32))], "fc"
            )
            shape = (op.filters, 1, 1)
        else:
            raise DlibFormatError(f"cannot translate layer kind {op.kind!r}")
        index += 1

    g.nodes.append(helper.make_node("Identity", [current], ["embedding"], name="embedding"))
    graph = helper.make_graph(
        g.nodes,
        "dlib_face_recognition_resnet_model_v1",
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["N", 3, net.input_size, net.input_size]
            )
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", shape[0]])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        producer_name=PRODUCER,
        producer_version=PRODUCER_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    model.doc_string = (
        "dlib face recognition ResNet v1 (CC0-1.0), converted from "
        "dlib_face_recognition_resnet_model_v1.dat; input RGB (x - mean) / 256"
    )
    means = ",".join(f"{m:.6f}" for m in net.channel_means)
    helper.set_model_props(model, {"channel_means_rgb": means, "input_scale": "256"})
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------------------
# Entry points


def write_onnx(net: DlibNetwork, out_path: Path) -> Path:
    """Build the ONNX model of ``net`` and write it atomically to ``out_path``."""
    model = build_onnx(net)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, model.SerializeToString(deterministic=True))
    return out_path


def convert_dlib_resnet(dat_path: Path, out_path: Path) -> Path:
    """Convert the ``.dat`` file at ``dat_path`` into an ONNX file at ``out_path``."""
    return write_onnx(parse_dlib_network(Path(dat_path).read_bytes()), out_path)
