"""Face-embedding backbones (112×112 aligned input, configurable embedding dimension).

``build_backbone(name, embedding_dim, **kwargs)`` is the one way the training
loop and the exporter create a network: ``iresnet18/34/50/100``,
``mobilefacenet``, the loss-comparison study's ``resnet50`` and ``mobilenetv1``, and
``dlib_resnet`` (the default recognizer's network, for fine-tuning from its weights).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from training.backbones.dlib_resnet import DlibResNet
from training.backbones.iresnet import IResNet
from training.backbones.mobilefacenet import MobileFaceNet
from training.backbones.mobilenet import MobileNetV1
from training.backbones.resnet import ResNet50

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": partial(IResNet, 18),
    "iresnet34": partial(IResNet, 34),
    "iresnet50": partial(IResNet, 50),
    "iresnet100": partial(IResNet, 100),
    "mobilefacenet": MobileFaceNet,
    "resnet50": ResNet50,
    "mobilenetv1": MobileNetV1,
    "dlib_resnet": DlibResNet,  # 150x150 dlib chip, 128-d; init: dlib_resnet_v1
}


def build_backbone(name: str, embedding_dim: int = 512, **kwargs) -> nn.Module:
    """A backbone by name; ``kwargs`` go to its constructor (``input_size``, ``width``,
    ``dropout``)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    try:
        return BACKBONES[name](embedding_dim=embedding_dim, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad parameters for backbone {name!r}: {exc}") from None
