"""The training loop: one process on CPU/GPU, or N processes under ``torchrun`` (DDP).

``facegate-train train --config cfg.yaml [key=value ...]`` (or
``torchrun --nproc_per_node=N -m training.cli train --config cfg.yaml``).

* backbone wrapped in DistributedDataParallel; the class-centre matrix is not
  replicated but sharded (:class:`training.partial_fc.MarginClassifier`), with
  Partial-FC sampling when ``loss.sample_rate < 1``;
* bf16/fp16 autocast (fp16 with a gradient scaler), channels-last, global
  gradient-norm clipping, warm-up + cosine/step learning rate per step;
* checkpoints ``last.pt`` / ``epoch_XXX.pt`` hold the full (gathered)
  class-centre matrix and its optimizer state, so a run resumes on a different
  number of processes; a run stopped by ``max_steps`` resumes mid-epoch;
* deterministic seeding (per rank), tqdm progress with samples/s and ETA,
  ``metrics.csv`` and optionally TensorBoard;
* optional verification on LFW-style pairs after epochs (rank 0);
* fine-tuning: ``init`` loads pretrained weights (a manifest model such as
  ``dlib_resnet_v1``, or a checkpoint of this package), the class centres start at
  each identity's mean normalised embedding, the backbone can train at
  ``optim.backbone_lr_mult`` times the learning rate, stay frozen for
  ``optim.freeze_epochs`` and keep ``backbone.freeze`` prefixes frozen throughout;
  batches are normalised with the backbone's input contract (:mod:`training.contract`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from service.files import replace_durably
from training import losses as L
from training.backbones import build_backbone
from training.config import TrainConfig
from training.contract import input_contract
from training.data import Augment, FaceImageFolder, PKSampler, RecordIODataset, ResumableSampler
from training.partial_fc import MarginClassifier

# --------------------------------------------------------------------------- process setup


class World:
    """Rank, world size and device of this process (DDP when launched by ``torchrun``)."""

    def __init__(self, device: str = "auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            # Every rank reaches this point before the group (and rank 0's TCP store) is torn
            # down; without it gloo can abort a rank that is still finishing its last collective.
            dist.barrier()
            dist.destroy_process_group()


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


# --------------------------------------------------------------------------- building blocks


def build_dataset(cfg: TrainConfig):
    augment = Augment(
        flip=cfg.data.flip,
        brightness=cfg.data.brightness,
        contrast=cfg.data.contrast,
        grayscale=cfg.data.grayscale,
    )
    contract = input_contract(cfg.backbone.name)
    dataset: RecordIODataset | FaceImageFolder
    if cfg.data.format == "recordio":
        dataset = RecordIODataset(cfg.data.root, augment, cfg.data.size)
    else:  # folder (the configuration admits no other format)
        identities = cfg.data.identities
        if identities is None and cfg.data.split:
            identities = json.loads(Path(cfg.data.split).read_text())["train"]
        if identities is None and cfg.data.max_identities:
            names = sorted(p.name for p in Path(cfg.data.root).iterdir() if p.is_dir())
            identities = names[: cfg.data.max_identities]
        dataset = FaceImageFolder(
            cfg.data.root,
            augment,
            identities=identities,
            min_images=cfg.data.min_images,
            size=cfg.data.size,
        )
    dataset.mean, dataset.std = contract.mean, contract.std
    return dataset


def _unwrapped(backbone: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` wrapper, or ``backbone`` itself."""
    inner = getattr(backbone, "module", backbone)
    assert isinstance(inner, nn.Module)
    return inner


def init_backbone(cfg: TrainConfig, backbone: nn.Module) -> None:
    """Load ``cfg.init`` into ``backbone``: a manifest model it can load, or a checkpoint of
    this package with the same backbone."""
    from training.contract import PRETRAINED_CONTRACTS

    ref = cfg.init
    if ref is None:
        return
    if not ref.endswith(".pt") and not Path(ref).is_file():
        from training.backbones.dlib_resnet import DlibResNet, pretrained_network

        if PRETRAINED_CONTRACTS.get(cfg.backbone.name) is None or not isinstance(
            backbone, DlibResNet
        ):
            raise ValueError(
                f"init {ref!r}: backbone {cfg.backbone.name!r} loads no pretrained "
                "model; give a checkpoint path, or use backbone dlib_resnet"
            )

        backbone.load_dlib(pretrained_network(ref))
        return
    state = torch.load(ref, map_location="cpu", weights_only=False)
    theirs = state.get("config", {}).get("backbone", {})
    if (theirs.get("name"), theirs.get("embedding_dim")) != (
        cfg.backbone.name,
        cfg.backbone.embedding_dim,
    ):
        raise ValueError(
            f"init {ref}: a {theirs.get('name')} ({theirs.get('embedding_dim')}-d) "
            f"checkpoint cannot start a {cfg.backbone.name} "
            f"({cfg.backbone.embedding_dim}-d) run"
        )
    backbone.load_state_dict(state["backbone"])


def freeze_prefixes(backbone: nn.Module, prefixes: list[str]) -> int:
    """Stop training parameters whose name starts with one of ``prefixes``; returns how many."""
    count = 0
    for name, param in backbone.named_parameters():
        if any(name == p or name.startswith(p.rstrip(".") + ".") for p in prefixes):
            param.requires_grad_(False)
            count += 1
    if prefixes and not count:
        raise ValueError(f"backbone.freeze {prefixes} matches no parameter")
    return count


@torch.no_grad()
def mean_embedding_centres(
    backbone: nn.Module, dataset, num_classes: int, device, batch_size: int = 64
) -> torch.Tensor:
    """(C, d) class centres: each identity's mean L2-normalised embedding (no augmentation),
    normalised; the usual start of a classification head on a pretrained backbone."""
    augment, dataset.augment = dataset.augment, None
    was_training = backbone.training
    backbone.eval()
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        sums = None
        counts = torch.zeros(num_classes, device=device)
        for images, labels in loader:
            emb = nn.functional.normalize(backbone(images.to(device)).float(), dim=1)
            labels = labels.to(device)
            if sums is None:
                sums = torch.zeros(num_classes, emb.shape[1], device=device)
            sums.index_add_(0, labels, emb)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
    finally:
        dataset.augment = augment
        backbone.train(was_training)
    if sums is None or bool((counts == 0).any()):
        raise ValueError("every class needs at least one image to initialise its centre")
    return nn.functional.normalize(sums / counts[:, None], dim=1)


class Objective(nn.Module):
    """Classification head (optionally Partial FC) + weighted auxiliary loss, or triplet alone."""

    def __init__(self, cfg: TrainConfig, num_classes: int):
        super().__init__()
        loss, dim = cfg.loss, cfg.backbone.embedding_dim
        self.classifier: MarginClassifier | None = None
        self.metric: nn.Module | None = None
        self.aux_weight = 0.0
        if loss.name == "triplet":
            self.metric = L.TripletLoss(**loss.params)
        else:
            head = L.build_head(loss.name, **loss.params)
            self.classifier = MarginClassifier(head, dim, num_classes, loss.sample_rate)
        if loss.aux is not None:
            if loss.name == "triplet":
                raise ValueError("triplet loss takes no auxiliary loss")
            if loss.aux.name == "center":
                self.metric = L.CenterLoss(num_classes, dim, **loss.aux.params)
            else:  # marginal (the configuration admits no other)
                self.metric = L.MarginalLoss(**loss.aux.params)
            self.aux_weight = float(loss.aux.weight)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        parts = {}
        total = embeddings.new_zeros((), dtype=torch.float32)
        if self.classifier is not None:
            parts["cls"] = self.classifier(embeddings, labels)
            total = total + parts["cls"]
        if self.metric is not None:
            value = self.metric(embeddings, labels)
            weight = self.aux_weight if self.classifier is not None else 1.0
            parts[type(self.metric).__name__] = value
            total = total + weight * value
        return total, {k: float(v.detach()) for k, v in parts.items()}


def build_optimizer(cfg: TrainConfig, backbone: nn.Module, objective: Objective):
    o = cfg.optim
    groups = [
        {
            "params": [p for p in backbone.parameters() if p.requires_grad],
            "name": "backbone",
            "lr": o.lr * o.backbone_lr_mult,
        }
    ]
    if objective.classifier is not None:
        groups.append({"params": [objective.classifier.weight], "name": "centres"})
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.name!r}: use sgd or adamw")


def build_scaler(device: torch.device, world_size: int):
    """The fp16 gradient scaler; under DDP one whose inf/NaN check is all-reduced over the ranks
    (each rank holds different class centres, so a local check could skip the step on some
    ranks only and let the scale, and with it the replicated backbone, drift apart)."""
    if world_size > 1:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def clip_and_step(optimizer, scaler, max_norm: float, world_size: int) -> tuple[float, bool]:
    """Unscale (fp16), clip to the global gradient norm, step; returns (norm, whether it stepped).

    The norm is that of the whole model's gradient, the same number on every rank: the backbone
    group's gradients are already identical on every rank (DDP all-reduced them), so they count
    once; the class centres are sharded, so the squared norms of the shards are summed over the
    ranks.  Every rank therefore applies the same clip coefficient, and a non-finite norm skips
    the step on every rank together (the fp16 scaler then backs off its scale everywhere).
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    replicated, sharded, has_shards = [], [], False
    for group in optimizer.param_groups:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if group.get("name") == "centres":
            has_shards = True
            sharded.extend(grads)
        else:
            replicated.extend(grads)
    squared = nn.utils.get_total_norm(replicated).float() ** 2
    sharded_sq = nn.utils.get_total_norm(sharded).float().to(squared.device) ** 2
    if world_size > 1 and has_shards:
        dist.all_reduce(sharded_sq)
    total = torch.sqrt(squared + sharded_sq)
    finite = bool(torch.isfinite(total))
    if finite:
        if max_norm > 0:
            nn.utils.clip_grads_with_norm_(replicated + sharded, max_norm, total)
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()  # the scaler's own (all-reduced) inf check decides the new scale
    return float(total), finite


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at ``step`` (linear warm-up, then the schedule)."""
    o = cfg.optim
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(o.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "step":
        epoch = step / steps_per_epoch
        return 0.1 ** sum(epoch >= m for m in o.milestones)
    if o.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule {o.schedule!r}: use cosine, step or constant")


class MetricLog:
    """``metrics.csv`` (always) and TensorBoard scalars (when asked and installed)."""

    def __init__(self, out: Path, mode: str, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.csv"
        self.writer = None
        if enabled and mode in ("tensorboard", "both"):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, step: int, epoch: int, values: dict) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["step", "epoch", "key", "value"])
            for key, value in values.items():
                writer.writerow([step, epoch, key, f"{value:.6g}"])
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _centre_param_ids(opt_state: dict) -> set[int]:
    return {i for g in opt_state["param_groups"] if g.get("name") == "centres" for i in g["params"]}


def save_checkpoint(
    path: Path,
    cfg: TrainConfig,
    world: World,
    backbone: nn.Module,
    objective: Objective,
    optimizer,
    scaler,
    epoch: int,
    step: int,
    history: list,
    classes: list[str] | None,
    epoch_samples: int = 0,
) -> None:
    """Rank 0 writes; every rank must call (centres, their optimizer state and RNGs are gathered).

    ``epoch`` is the number of finished epochs, ``epoch_samples`` how many samples (all ranks
    together) of the next one were already trained on: a run stopped mid-epoch resumes there.
    Nothing in the file depends on the number of processes that wrote it except ``rng``
    (one state per rank, restored only when resuming on as many processes).
    """
    clf = objective.classifier
    full = clf.full_weight() if clf is not None else None
    centre_optim = None
    if clf is not None:  # the centres' momentum / Adam moments, gathered like the centres
        local = optimizer.state.get(clf.weight, {})
        centre_optim = {
            k: clf.gather_rows(v) if _per_centre(v, clf) else v for k, v in sorted(local.items())
        }
    rng = _rng_state()
    if world.world_size > 1:
        ranks: list[Any] = [None] * world.world_size
        dist.all_gather_object(ranks, rng)
    else:
        ranks = [rng]
    if not world.main:
        return
    module = _unwrapped(backbone)
    opt_state = optimizer.state_dict()
    centre_ids = _centre_param_ids(opt_state)
    opt_state = {
        "state": {k: v for k, v in opt_state["state"].items() if k not in centre_ids},
        "param_groups": opt_state["param_groups"],
    }
    state = {
        "config": cfg.to_dict(),
        "backbone": module.state_dict(),
        "centres": full,
        "centre_optim": centre_optim,
        "objective_buffers": {
            k: v for k, v in objective.state_dict().items() if not k.endswith("classifier.weight")
        },
        "optimizer": opt_state,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "epoch_samples": epoch_samples,
        "step": step,
        "world_size": world.world_size,
        "history": history,
        "classes": classes,
        "rng": ranks,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    replace_durably(tmp, path)


def _per_centre(value, clf: MarginClassifier) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == clf.weight.shape[0]


def load_checkpoint(
    path: Path,
    world: World,
    backbone: nn.Module,
    objective: Objective,
    optimizer,
    scaler,
    cfg: TrainConfig | None = None,
) -> dict:
    """Restore a checkpoint written under any number of processes into this rank.

    The centres and their optimizer state are resharded; each rank gets back its own RNG
    state when the world size is unchanged, otherwise fresh per-rank seeds derived from
    (seed, step, rank) so that no rank replays the random stream of the run's start.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    module = _unwrapped(backbone)
    module.load_state_dict(state["backbone"])
    clf = objective.classifier
    if clf is not None and state["centres"] is not None:
        clf.load_full_weight(state["centres"])
    objective.load_state_dict({**objective.state_dict(), **state["objective_buffers"]})
    opt_state = state["optimizer"]
    centre_optim = state.get("centre_optim")
    if clf is not None and (centre_optim is not None or state["world_size"] != world.world_size):
        # the centres' state is stored gathered (or, in older files, as rank 0's shard only)
        centre_ids = _centre_param_ids(opt_state) or {len(optimizer.param_groups[0]["params"])}
        opt_state = {
            "state": {k: v for k, v in opt_state["state"].items() if k not in centre_ids},
            "param_groups": opt_state["param_groups"],
        }
    optimizer.load_state_dict(opt_state)
    if clf is not None and centre_optim:
        weight = clf.weight
        optimizer.state[weight] = {
            k: (
                clf.local_rows(v).to(weight.device, weight.dtype).clone()
                if torch.is_tensor(v) and v.dim() > 0
                else v
            )
            for k, v in centre_optim.items()
        }
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = state.get("rng")
    if isinstance(rng, dict):  # older files: one state, rank 0's
        rng = [rng] if state["world_size"] == 1 else None
    if rng and len(rng) == world.world_size:
        _set_rng_state(rng[world.rank])
    elif cfg is not None:
        seed_everything(cfg.seed + 1_000_003 * state["step"], world.rank, cfg.deterministic)
    return state


# --------------------------------------------------------------------------- the loop


def _amp_dtype(cfg: TrainConfig):
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]


def evaluate_pairs(cfg: TrainConfig, backbone: nn.Module, device, cache: dict) -> dict | None:
    """Verification accuracy on the configured pairs (rank 0), or None when none configured."""
    from training import evaluate as ev

    if not (cfg.eval.pairs or cfg.eval.bin):
        return None
    if "pairs" not in cache:
        if cfg.eval.bin:
            cache["pairs"] = ev.load_bin(cfg.eval.bin)
        else:
            cache["pairs"] = ev.load_pairs(
                cfg.eval.pairs,
                cfg.eval.aligned,
                cfg.eval.raw or None,
                cfg.eval.folds,
                cfg.eval.max_pairs_per_fold,
            )
    module = _unwrapped(backbone)
    contract = input_contract(cfg.backbone.name)
    embed = ev.torch_embedder(
        module, str(device), input_size=cfg.data.size, mean=contract.mean, std=contract.std
    )
    report = ev.evaluate_model(embed, cache["pairs"], calibrate=False)
    module.train()
    return report


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary (history, paths, timings)."""
    world = World(cfg.device)
    try:
        return _train(cfg, world)
    finally:
        world.close()


@dataclass
class _Batches:
    """The data side of a run: the dataset and its (resumable) loader."""

    dataset: Any
    sampler: ResumableSampler
    generator: torch.Generator
    loader: DataLoader
    batch_size: int  # per process

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)


@dataclass
class _Model:
    """What trains: the backbone (DDP-wrapped on several processes), the objective, the
    optimizer and its loss scaler, and how batches are laid out in memory."""

    backbone: nn.Module
    objective: Objective
    optimizer: Any
    base_lrs: list[float]
    scaler: Any
    amp_dtype: Any
    memory_format: torch.memory_format


@dataclass
class _Progress:
    """Where the run is: steps taken, history, and the counters of the summary."""

    start_epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    skip_batches: int = 0  # batches of ``start_epoch`` already trained (a resumed run)
    samples_seen: int = 0
    skipped: int = 0  # optimizer steps skipped (non-finite gradients)
    started: float = field(default_factory=time.perf_counter)


def _train(cfg: TrainConfig, world: World) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, world.rank, cfg.deterministic)
    out = Path(cfg.output)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    batches = _build_batches(cfg, world)
    resume = cfg.resume
    if resume == "auto":
        resume = str(out / "last.pt") if (out / "last.pt").exists() else None
    model = _build_model(cfg, world, batches, bool(resume))
    progress = _Progress()
    if resume:
        _resume(cfg, world, model, batches, progress, Path(resume))
    log = MetricLog(out, cfg.log, world.main)
    eval_cache: dict = {}
    progress.started = time.perf_counter()
    for epoch in range(progress.start_epoch, cfg.epochs):
        first_batch = progress.skip_batches if epoch == progress.start_epoch else 0
        entry, stop, batch_index = _run_epoch(
            cfg, world, model, batches, progress, log, epoch, first_batch
        )
        _end_epoch(
            cfg,
            world,
            model,
            batches,
            progress,
            log,
            out,
            eval_cache,
            epoch,
            entry,
            stop,
            batch_index,
        )
        world.barrier()
        if stop:
            break
    log.close()
    return _summary(world, batches, progress, out)


def _build_batches(cfg: TrainConfig, world: World) -> _Batches:
    """The dataset, its sampler (identity-balanced for triplet/pk, else shuffled and split
    over the processes) and the loader; refuses a dataset smaller than one batch."""
    dataset = build_dataset(cfg)
    base_sampler: PKSampler | DistributedSampler
    if cfg.loss.pk or cfg.loss.name == "triplet":
        p, k = cfg.loss.pk or [max(2, cfg.batch_size // 4), 4]
        base_sampler = PKSampler(dataset.labels, p, k, cfg.seed, world.rank, world.world_size)
        batch_size = p * k
    else:
        base_sampler = DistributedSampler(
            dataset, world.world_size, world.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        batch_size = cfg.batch_size
    sampler = ResumableSampler(base_sampler)
    generator = torch.Generator().manual_seed(cfg.seed + world.rank)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.workers,
        pin_memory=world.device.type == "cuda",
        persistent_workers=cfg.data.workers > 0,
        generator=generator,
        worker_init_fn=_seed_worker,
    )
    batches = _Batches(dataset, sampler, generator, loader, batch_size)
    if batches.steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images is less than one batch of {batch_size}")
    return batches


def _build_model(cfg: TrainConfig, world: World, batches: _Batches, resuming: bool) -> _Model:
    """The backbone (pretrained weights unless resuming, frozen prefixes, on the device),
    the objective (class centres from the mean embeddings with ``init``), the optimizer."""
    device = world.device
    params = dict(cfg.backbone.params)
    if params.setdefault("input_size", cfg.data.size) != cfg.data.size:
        raise ValueError(f"backbone input_size {params['input_size']} != data.size {cfg.data.size}")
    backbone = build_backbone(cfg.backbone.name, cfg.backbone.embedding_dim, **params)
    if not resuming:
        init_backbone(cfg, backbone)
    freeze_prefixes(backbone, cfg.backbone.freeze)
    backbone = backbone.to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    # Module.to takes memory_format at run time; torch's stubs omit it from the overloads
    backbone = backbone.to(memory_format=memory_format)  # type: ignore[call-overload]
    num_classes = batches.dataset.num_classes
    objective = Objective(cfg, num_classes).to(device)
    if (
        cfg.init
        and not resuming
        and objective.classifier is not None
        and cfg.init_centres == "mean"
    ):
        objective.classifier.load_full_weight(
            mean_embedding_centres(backbone, batches.dataset, num_classes, device)
        )
    if world.world_size > 1:
        backbone = nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = build_optimizer(cfg, backbone, objective)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    amp_dtype = _amp_dtype(cfg)
    scaler = build_scaler(device, world.world_size) if amp_dtype == torch.float16 else None
    return _Model(backbone, objective, optimizer, base_lrs, scaler, amp_dtype, memory_format)


def _resume(
    cfg: TrainConfig,
    world: World,
    model: _Model,
    batches: _Batches,
    progress: _Progress,
    path: Path,
) -> None:
    """Load the checkpoint at ``path`` into the model and ``progress``."""
    state = load_checkpoint(
        path, world, model.backbone, model.objective, model.optimizer, model.scaler, cfg
    )
    progress.start_epoch, progress.step = state["epoch"], state["step"]
    progress.history = state["history"]
    # a run stopped mid-epoch goes on with the batches of that epoch it has not seen (the
    # samplers' global order does not depend on the world size: exact when the samples
    # already seen are a whole number of this world's global batches)
    skip = state.get("epoch_samples", 0) // (batches.batch_size * world.world_size)
    if skip >= batches.steps_per_epoch:
        progress.start_epoch, skip = progress.start_epoch + 1, 0
    progress.skip_batches = skip
    # new DataLoader worker seeds, not those of the run's first epoch
    batches.generator.manual_seed(cfg.seed + world.rank + 1_000_003 * progress.step)


def _run_epoch(
    cfg: TrainConfig,
    world: World,
    model: _Model,
    batches: _Batches,
    progress: _Progress,
    log: MetricLog,
    epoch: int,
    first_batch: int,
) -> tuple[dict, bool, int]:
    """One epoch from batch ``first_batch`` (or until ``max_steps``): its history entry,
    whether the run stops here, and the index of the next batch."""
    device, steps_per_epoch, batch_size = world.device, batches.steps_per_epoch, batches.batch_size
    backbone, objective, optimizer, scaler = (
        model.backbone,
        model.objective,
        model.optimizer,
        model.scaler,
    )
    batches.sampler.set_epoch(epoch)
    batches.sampler.skip = first_batch * batch_size
    backbone.train()
    objective.train()
    epoch_loss, epoch_steps, epoch_start = 0.0, 0, time.perf_counter()
    batch_index = first_batch
    stop = False
    bar = None
    if cfg.progress and world.main:
        from tqdm import tqdm

        bar = tqdm(
            total=steps_per_epoch,
            initial=first_batch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            dynamic_ncols=True,
        )
    for images, labels in batches.loader:
        factor = lr_factor(cfg, epoch * steps_per_epoch + batch_index, steps_per_epoch)
        for group, base in zip(optimizer.param_groups, model.base_lrs, strict=True):
            group["lr"] = base * factor
        images = images.to(device, non_blocking=True).to(memory_format=model.memory_format)
        labels = labels.to(device, non_blocking=True)
        # frozen warm-up: only the centres train (no backbone gradients at all)
        frozen = epoch * steps_per_epoch + batch_index < cfg.optim.freeze_epochs * steps_per_epoch
        amp_dtype = model.amp_dtype
        with (
            torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
            torch.set_grad_enabled(not frozen),
        ):
            embeddings = backbone(images)
        loss, parts = objective(embeddings.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        grad_norm, stepped = clip_and_step(optimizer, scaler, cfg.optim.grad_clip, world.world_size)
        progress.skipped += not stepped
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {progress.step}")
        progress.step += 1
        epoch_steps += 1
        batch_index += 1
        epoch_loss += value
        progress.samples_seen += batch_size * world.world_size
        elapsed = time.perf_counter() - progress.started
        if world.main:
            record = {"loss": value, "lr": optimizer.param_groups[0]["lr"], **parts}
            record["grad_norm"] = grad_norm
            if not stepped:
                record["skipped_step"] = 1.0
            log.write(progress.step, epoch + 1, record)
        if bar is not None:
            bar.set_postfix(loss=f"{value:.3f}", samples_s=f"{progress.samples_seen / elapsed:.1f}")
            bar.update(1)
        if cfg.max_steps and progress.step >= cfg.max_steps:
            stop = True
            break
    if bar is not None:
        bar.close()
    entry = {
        "epoch": epoch + 1,
        "step": progress.step,
        "loss": epoch_loss / max(1, epoch_steps),
        "seconds": round(time.perf_counter() - epoch_start, 2),
    }
    if batch_index < steps_per_epoch:  # stopped by max_steps: a resumed run continues this epoch
        entry["batches"] = batch_index
    return entry, stop, batch_index


def _end_epoch(
    cfg: TrainConfig,
    world: World,
    model: _Model,
    batches: _Batches,
    progress: _Progress,
    log: MetricLog,
    out: Path,
    eval_cache: dict,
    epoch: int,
    entry: dict,
    stop: bool,
    batch_index: int,
) -> None:
    """After an epoch: evaluate on the pairs when due, record it, write the checkpoints."""
    finished = batch_index >= batches.steps_per_epoch
    last = stop or epoch + 1 == cfg.epochs
    if world.main and (last or (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0)):
        report = evaluate_pairs(cfg, model.backbone, world.device, eval_cache)
        if report is not None:
            entry["eval_accuracy"], entry["eval_std"] = report["accuracy"], report["std"]
            log.write(progress.step, epoch + 1, {"eval/accuracy": report["accuracy"]})
    progress.history.append(entry)
    if world.main:
        log.write(progress.step, epoch + 1, {"epoch_loss": entry["loss"]})
    if last or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0):
        names = ["last.pt"] + ([f"epoch_{epoch + 1:03d}.pt"] if last and finished else [])
        for name in names:
            save_checkpoint(
                out / name,
                cfg,
                world,
                model.backbone,
                model.objective,
                model.optimizer,
                model.scaler,
                epoch + 1 if finished else epoch,
                progress.step,
                progress.history,
                getattr(batches.dataset, "classes", None),
                0 if finished else batch_index * batches.batch_size * world.world_size,
            )


def _summary(world: World, batches: _Batches, progress: _Progress, out: Path) -> dict:
    """The run's summary (also ``summary.json`` in the output folder)."""
    seconds = time.perf_counter() - progress.started
    summary = {
        "output": str(out),
        "checkpoint": str(out / "last.pt"),
        "history": progress.history,
        "images": len(batches.dataset),
        "identities": batches.dataset.num_classes,
        "steps": progress.step,
        "skipped_steps": progress.skipped,
        "world_size": world.world_size,
        "device": str(world.device),
        "seconds": round(seconds, 2),
        "samples_per_second": round(progress.samples_seen / max(1e-9, seconds), 2),
    }
    if world.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
