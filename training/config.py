"""Training configuration: one pydantic model tree, read from YAML (or JSON), overridable from
the CLI.

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
``key=value`` pairs (values parsed as YAML scalars).  Every key and every string option
(``data.format``, ``optim.name``, ``optim.schedule``, ``amp``, ``log``, ...) is checked when
the configuration is loaded: an unknown key or choice is a ``ValueError`` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Section(BaseModel):
    # unknown keys are refused; numbers are accepted where text is expected (a YAML
    # override such as ``init=123`` parses as a number); assignments are checked too
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True)


class DataConfig(_Section):
    root: str = ""
    format: Literal["folder", "recordio"] = "folder"
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


class BackboneConfig(_Section):
    name: str = "mobilefacenet"
    embedding_dim: int = 512
    params: dict[str, Any] = Field(default_factory=dict)  # width, input_size, dropout
    freeze: list[str] = Field(default_factory=list)  # parameter-name prefixes never trained


class AuxLossConfig(_Section):
    name: Literal["center", "marginal"] = "center"  # added to the classification loss
    weight: float = 0.01
    params: dict[str, Any] = Field(default_factory=dict)


class LossConfig(_Section):
    name: str = "arcface"  # a head of training.losses.HEADS, or "triplet"
    params: dict[str, Any] = Field(default_factory=dict)
    aux: AuxLossConfig | None = None
    sample_rate: float = 1.0  # Partial FC; 1.0 = full softmax
    pk: list[int] | None = None  # [P, K] identity-balanced batches (triplet, marginal)


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    milestones: list[float] = Field(default_factory=list)  # step: epochs where lr *= 0.1
    grad_clip: float = 5.0  # max global grad norm; 0 = off
    backbone_lr_mult: float = 1.0  # backbone lr = lr * this (fine-tuning: < 1); centres get lr
    freeze_epochs: float = 0.0  # backbone frozen (only the centres train) for these epochs


class EvalConfig(_Section):
    pairs: str = ""  # pairs.txt
    aligned: str = ""  # aligned crops of the pair images
    raw: str = ""  # raw images (fallback for faces the detector missed)
    bin: str = ""  # or an InsightFace .bin
    every: int = 1  # epochs; 0 = only at the end
    folds: int | None = None
    max_pairs_per_fold: int | None = None


class TrainConfig(_Section):
    output: str = "runs/default"
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    epochs: int = 20
    max_steps: int | None = None  # stop early (tests, smoke runs)
    batch_size: int = 128  # per process
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda (or cuda:N)
    threads: int | None = None  # CPU threads (torch.set_num_threads)
    log: Literal["csv", "tensorboard", "both"] = "csv"
    progress: bool = True
    checkpoint_every: int = 1  # epochs
    resume: str | None = None  # checkpoint path, or "auto" = output/last.pt if present
    # start from pretrained weights: a manifest model the backbone can load (dlib_resnet_v1 for
    # backbone dlib_resnet) or a checkpoint this package wrote (same backbone); a resumed run
    # ignores it
    init: str | None = None
    init_centres: Literal["mean", "random"] = "mean"  # with init: class centres at start

    def to_dict(self) -> dict:
        return self.model_dump()


def _section(path: tuple) -> type[BaseModel]:
    """The model class of the section at ``path`` (e.g. ``("loss", "aux")``)."""
    model: type[BaseModel] = TrainConfig
    for part in path:
        annotation = model.model_fields[str(part)].annotation
        model = next(
            (a for a in (annotation, *getattr(annotation, "__args__", ())) if _is_model(a)), model
        )
    return model


def _is_model(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def from_dict(data: dict) -> TrainConfig:
    """The configuration in ``data``.  A ``ValueError`` names the unknown keys of the
    outermost section that has any (``unknown LossConfig keys: ['nope']``), else every bad
    value (``bad training configuration: amp: ...``)."""
    if not isinstance(data, dict):
        raise ValueError(f"TrainConfig expects a mapping, got {data!r}")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
    unknown: dict[tuple, list[str]] = {}
    for error in errors:
        if error["type"] == "extra_forbidden":
            unknown.setdefault(tuple(error["loc"][:-1]), []).append(str(error["loc"][-1]))
    if unknown:
        where = min(unknown, key=len)
        raise ValueError(f"unknown {_section(where).__name__} keys: {sorted(unknown[where])}")
    problems = "; ".join(
        f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in errors
    )
    raise ValueError(f"bad training configuration: {problems}")


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
