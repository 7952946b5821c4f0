"""The input contract of a backbone: crop (template, size) and normalisation, as a card states it.

A network trained from scratch here takes the ArcFace 112×112 crop normalised
``(x - 127.5) / 128`` (:data:`training.data.MEAN`, :data:`~training.data.STD`).
A network fine-tuned from a pretrained model keeps that model's contract, read
from its card in the manifest (the one place that knows it): ``dlib_resnet``
takes ``dlib_resnet_v1``'s 150×150 chip, RGB ``(x - channel_mean) / 256``. The
same contract prepares the data (``facegate-train prepare --recognizer``),
normalises training batches, and goes into the exported card, so the service
aligns and normalises for the fine-tuned model exactly as for the original.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Backbones whose contract is a pretrained model's card: backbone name -> manifest name.
PRETRAINED_CONTRACTS = {"dlib_resnet": "dlib_resnet_v1"}


@dataclass(frozen=True)
class InputContract:
    mean: tuple[float, float, float]  # RGB
    std: tuple[float, float, float]
    template: tuple[tuple[float, float], ...]  # five (x, y) points in the crop
    crop_size: tuple[int, int]  # (w, h) of the aligned crop
    source: str  # the card it comes from, or "arcface" (this package's own default)

    def card_fields(self, input_size: int) -> dict:
        """``preprocessing`` and ``alignment`` of a model card (``ModelCard`` field values)."""
        return {
            "preprocessing": {
                "input_size": (input_size, input_size),
                "color": "RGB",
                "mean": self.mean,
                "std": self.std,
                "layout": "NCHW",
            },
            "alignment": {"template": [tuple(p) for p in self.template], "size": self.crop_size},
        }


def input_contract(backbone: str) -> InputContract:
    """The contract of ``backbone`` (a :data:`training.backbones.BACKBONES` name)."""
    from service.registry import ARCFACE_TEMPLATE_112
    from training.data import MEAN, STD

    name = PRETRAINED_CONTRACTS.get(backbone)
    if name is None:
        return InputContract(
            (MEAN, MEAN, MEAN),
            (STD, STD, STD),
            tuple((x, y) for x, y in ARCFACE_TEMPLATE_112),
            (112, 112),
            "arcface",
        )
    from service.config import MANIFEST_PATH
    from service.registry import Registry

    card = Registry(MANIFEST_PATH, []).manifest_cards[name]
    pre, align = card.preprocessing, card.alignment
    if pre.color != "RGB" or pre.layout != "NCHW" or align is None:
        raise ValueError(f"{name}: only RGB NCHW cards with an alignment can be fine-tuned")
    return InputContract(
        pre.mean,
        pre.std,
        tuple((x, y) for x, y in align.template),
        align.size,
        name,
    )
