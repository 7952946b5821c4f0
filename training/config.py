"""Training configuration: one dataclass tree, read from YAML (or JSON), overridable from the CLI.

Example (``configs/`` style)::

    data: {root: /tmp/celeba112, format: folder}
    backbone: {name: mobilefacenet, embedding_dim: 128, params: {width: 0.5}}
    loss: {name: cosface, params: {s: 32.0, m: 0.35}}
    # fine-tuning: init: dlib_resnet_v1 (with backbone {name: dlib_resnet, embedding_dim: 128}),
    # optim.backbone_lr_mult, optim.freeze_epochs, backbone.freeze: [stem, level1]
    epochs: 20
    batch_size: 128
    amp: bf16

``override(cfg, ["loss.params.m=0.4", "epochs=5"])`` applies dotted
``key=value`` pairs (values parsed as YAML scalars).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    root: str = ""
    format: str = "folder"  # folder | recordio
    identities: list[str] | None = None  # restrict to these (folder format)
    split: str | None = None  # or a split file's "train" identities (training/splits/*.json)
    max_identities: int | None = None  # the first N identities (sorted), for small runs
    min_images: int = 1
    size: int = 112  # crops are resized to this side when it differs (= backbone input_size)
    flip: bool = True
    brightness: float = 0.0
    contrast: float = 0.0
    grayscale: float = 0.0
    workers: int = 2


@dataclass
class BackboneConfig:
    name: str = "mobilefacenet"
    embedding_dim: int = 512
    params: dict[str, Any] = field(default_factory=dict)  # width, input_size, dropout
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes never trained


@dataclass
class AuxLossConfig:
    name: str = "center"  # center | marginal (added to the classification loss)
    weight: float = 0.01
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    name: str = "arcface"  # a head of training.losses.HEADS, or "triplet"
    params: dict[str, Any] = field(default_factory=dict)
    aux: AuxLossConfig | None = None
    sample_rate: float = 1.0  # Partial FC; 1.0 = full softmax
    pk: list[int] | None = None  # [P, K] identity-balanced batches (triplet, marginal)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    schedule: str = "cosine"  # cosine | constant | step
    milestones: list[float] = field(default_factory=list)  # step: epochs where lr *= 0.1
    grad_clip: float = 5.0  # max global grad norm; 0 = off
    backbone_lr_mult: float = 1.0  # backbone lr = lr * this (fine-tuning: < 1); centres get lr
    freeze_epochs: float = 0.0  # backbone frozen (only the centres train) for these epochs


@dataclass
class EvalConfig:
    pairs: str = ""  # pairs.txt
    aligned: str = ""  # aligned crops of the pair images
    raw: str = ""  # raw images (fallback for faces the detector missed)
    bin: str = ""  # or an InsightFace .bin
    every: int = 1  # epochs; 0 = only at the end
    folds: int | None = None
    max_pairs_per_fold: int | None = None


@dataclass
class TrainConfig:
    output: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    epochs: int = 20
    max_steps: int | None = None  # stop early (tests, smoke runs)
    batch_size: int = 128  # per process
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # CPU threads (torch.set_num_threads)
    log: str = "csv"  # csv | tensorboard | both
    progress: bool = True
    checkpoint_every: int = 1  # epochs
    resume: str | None = None  # checkpoint path, or "auto" = output/last.pt if present
    # start from pretrained weights: a manifest model the backbone can load (dlib_resnet_v1 for
    # backbone dlib_resnet) or a checkpoint this package wrote (same backbone); a resumed run
    # ignores it
    init: str | None = None
    init_centres: str = "mean"  # with init: mean | random (class centres at start)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: dict):
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} expects a mapping, got {data!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls, name))
        kwargs[name] = _build(sub, value) if sub is not None and value is not None else value
    return cls(**kwargs)


_NESTED = {
    (TrainConfig, "data"): DataConfig,
    (TrainConfig, "backbone"): BackboneConfig,
    (TrainConfig, "loss"): LossConfig,
    (TrainConfig, "optim"): OptimConfig,
    (TrainConfig, "eval"): EvalConfig,
    (LossConfig, "aux"): AuxLossConfig,
}


def from_dict(data: dict) -> TrainConfig:
    return _build(TrainConfig, data)


def load_config(path: Path | str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A config from a YAML/JSON file (or defaults when ``path`` is None) plus overrides."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        if str(path).endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        import yaml

        value = yaml.safe_load(raw)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return from_dict(data)
