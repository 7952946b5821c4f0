"""The face-api.js port of dlib's face-recognition ResNet (npm ``@vladmandic/face-api``,
``face_recognition_model``): a fallback source for the same network.

Its TensorFlow.js weights (uint8-quantised, a manifest plus one binary shard) are read
into a :class:`~service.convert.dlib_resnet.DlibNetwork` walking dlib's own layer
definition, so the ONNX graph comes from the same builder as the ``.dat`` conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.convert.dlib_resnet import (
    INPUT_SIZE,
    DlibFormatError,
    DlibNetwork,
    face_recognition_resnet_v1,
    write_onnx,
)

#: dlib's input means, which the face-api.js port hard-codes instead of storing them.
DLIB_CHANNEL_MEANS = (122.782, 117.001, 104.298)
_QUANTISED_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}


def faceapi_layer_names() -> list[str]:
    """face-api.js weight-name prefixes of the 29 conv+scale pairs, input to output."""
    names = ["conv32_down"]
    for width, blocks in (
        (32, ["1", "2", "3"]),
        (64, ["down", "1", "2", "3"]),
        (128, ["down", "1", "2"]),
        (256, ["down", "1", "2", "down_out"]),
    ):
        names += [f"conv{width}_{block}/{conv}" for block in blocks for conv in ("conv1", "conv2")]
    return names


def read_tfjs_weights(manifest: list[dict], blob: bytes) -> dict[str, np.ndarray]:
    """A TensorFlow.js weights manifest + its binary shard(s) -> name -> float32 array.

    Quantised entries are ``q * scale + min`` (uint8/uint16) or float16.
    """
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for group in manifest:
        for entry in group["weights"]:
            shape = tuple(int(d) for d in entry["shape"])
            count = int(np.prod(shape)) if shape else 1
            quant = entry.get("quantization")
            if entry.get("dtype", "float32") != "float32":
                raise DlibFormatError(f"{entry['name']}: unsupported dtype {entry.get('dtype')}")
            dtype = np.dtype(_QUANTISED_DTYPES[quant["dtype"]] if quant else "<f4").newbyteorder(
                "<"
            )
            size = count * dtype.itemsize
            if offset + size > len(blob):
                raise DlibFormatError(f"weights file too short for {entry['name']}")
            raw = np.frombuffer(blob, dtype=dtype, count=count, offset=offset)
            offset += size
            if quant and quant["dtype"] in ("uint8", "uint16"):
                values = raw.astype(np.float64) * quant["scale"] + quant["min"]
            else:
                values = raw
            arrays[entry["name"]] = np.asarray(values, dtype=np.float32).reshape(shape)
    if offset != len(blob):
        raise DlibFormatError(f"{len(blob) - offset} unexpected trailing bytes in the weights file")
    return arrays


def parse_faceapi_network(manifest: list[dict], blob: bytes) -> DlibNetwork:
    """The face-api.js ``face_recognition_model`` weights as a :class:`DlibNetwork`."""
    weights = read_tfjs_weights(manifest, blob)
    ops = face_recognition_resnet_v1()
    names = iter(faceapi_layer_names())
    params: list[dict[str, np.ndarray]] = []
    channels = 3
    prefix = ""
    try:
        for op in ops:
            if op.kind == "con":
                prefix = next(names)
                filters = weights.pop(f"{prefix}/conv/filters")  # (kh, kw, in, out)
                expected = (op.window, op.window, channels, op.filters)
                if filters.shape != expected:
                    raise DlibFormatError(f"{prefix}: filters {filters.shape}, expected {expected}")
                params.append(
                    {
                        "weight": np.ascontiguousarray(filters.transpose(3, 2, 0, 1)),
                        "bias": weights.pop(f"{prefix}/conv/bias").reshape(-1),
                    }
                )
                channels = op.filters
            elif op.kind == "affine":
                params.append(
                    {
                        "gamma": weights.pop(f"{prefix}/scale/weights").reshape(-1),
                        "beta": weights.pop(f"{prefix}/scale/biases").reshape(-1),
                    }
                )
            elif op.kind == "fc":
                fc = weights.pop("fc")
                if fc.shape != (channels, op.filters):
                    raise DlibFormatError(
                        f"fc: shape {fc.shape}, expected {(channels, op.filters)}"
                    )
                params.append({"weight": fc})
            else:
                params.append({})
    except KeyError as exc:
        raise DlibFormatError(f"weights manifest lacks {exc.args[0]!r}") from None
    if weights:
        raise DlibFormatError(f"unexpected weights: {', '.join(sorted(weights))[:200]}")
    for layer in params:
        for name, array in layer.items():
            if not np.all(np.isfinite(array)):
                raise DlibFormatError(f"non-finite values in a layer's {name}")
    return DlibNetwork(
        ops=ops, params=params, channel_means=DLIB_CHANNEL_MEANS, input_size=INPUT_SIZE
    )


def convert_faceapi_resnet(manifest_json: bytes, weights: bytes, out_path: Path) -> Path:
    """Convert face-api.js's ``face_recognition_model`` (weights manifest JSON + ``.bin``)."""
    try:
        manifest = json.loads(manifest_json)
    except ValueError as exc:
        raise DlibFormatError(f"weights manifest is not JSON: {exc}") from None
    return write_onnx(parse_faceapi_network(manifest, weights), out_path)
