"""``facegate-train train`` under ``torchrun`` (2 gloo processes on CPU), stopped mid-epoch,
resumed in 1 process: the step counter, the epoch position, the class centres and their
optimizer state carry over."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from tests.conftest import REPO
from tests.training.test_training_loop import celeba_tiny  # noqa: F401

BATCH = 4  # per process; the 28-image CelebA slice gives 3 steps/epoch on 2 ranks, 7 on one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(data, out, **extra) -> list[str]:
    values = {
        "data.root": str(data),
        "data.workers": 0,
        "data.size": 56,
        "data.flip": True,
        "backbone.name": "mobilefacenet",
        "backbone.embedding_dim": 32,
        "backbone.params": {"width": 0.25},
        "loss.name": "arcface",
        "loss.params": {"s": 16.0, "m": 0.3},
        "batch_size": BATCH,
        "threads": 1,
        "progress": False,
        "output": str(out),
        "optim.lr": 0.05,
        "optim.weight_decay": 0,
        "optim.grad_clip": 1.0,
        "epochs": 2,
        "device": "cpu",
        **extra,
    }
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _run(args: list[str]) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _losses(out) -> dict[int, float]:
    with open(out / "metrics.csv") as fh:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(fh) if r["key"] == "loss"}


@pytest.mark.timeout(300)
def test_torchrun_two_processes_then_resume_mid_epoch_in_one(celeba_tiny, tmp_path):  # noqa: F811
    from training.config import from_dict
    from training.train import Objective, World, build_optimizer, load_checkpoint

    out = tmp_path / "run"
    two = _run(
        [
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "training.cli",
            "train",
            *_overrides(celeba_tiny, out, max_steps=2),
        ]
    )
    assert two["world_size"] == 2 and two["steps"] == 2 and two["identities"] == 6
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    # stopped after 2 of the epoch's 3 steps: the epoch is not counted as done
    assert (state["epoch"], state["epoch_samples"], state["step"]) == (0, 2 * BATCH * 2, 2)
    assert state["history"][-1]["batches"] == 2
    assert not (out / "epoch_001.pt").exists()
    # one RNG state per rank (each rank was seeded differently)
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # the centres and their momentum are gathered from both shards (rows 0-2 and 3-5)
    momentum = state["centre_optim"]["momentum_buffer"]
    assert state["centres"].shape == momentum.shape == (6, 32)
    assert momentum[:3].abs().sum() > 0 and momentum[3:].abs().sum() > 0

    # the checkpoint loads into one process: every centre and its momentum, resharded
    cfg = from_dict(state["config"])
    from training.backbones import build_backbone

    backbone = build_backbone("mobilefacenet", 32, width=0.25, input_size=56)
    objective = Objective(cfg, 6)
    optimizer = build_optimizer(cfg, backbone, objective)
    load_checkpoint(out / "last.pt", World("cpu"), backbone, objective, optimizer, None, cfg)
    weight = objective.classifier.weight
    assert torch.equal(weight.detach(), state["centres"])
    assert torch.equal(optimizer.state[weight]["momentum_buffer"], momentum)
    assert all("momentum_buffer" in optimizer.state[p] for p in backbone.parameters())

    # resume in one process: the rest of epoch 1 (28 images: 7 steps of 4; 16 images seen ->
    # 3 left), then 2 steps of epoch 2
    one = _run(
        ["-m", "training.cli", "train", *_overrides(celeba_tiny, out, max_steps=7, resume="auto")]
    )
    assert one["world_size"] == 1 and one["steps"] == 7
    history = json.loads((out / "summary.json").read_text())["history"]
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 2), (1, 5), (2, 7)]
    assert "batches" not in history[1] and history[2]["batches"] == 2
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 8))
    assert all(math.isfinite(v) for v in losses.values())
    resumed = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert (resumed["epoch"], resumed["epoch_samples"], resumed["world_size"]) == (1, 2 * BATCH, 1)
    assert resumed["centres"].shape == (6, 32) and torch.isfinite(resumed["centres"]).all()
    # the single process trained every centre, both former shards
    change = (resumed["centres"] - state["centres"]).abs().sum(dim=1)
    assert (change > 0).all()
    assert not (out / "epoch_001.pt").exists()  # epoch 1 was finished, but was not the last


def test_resumed_sampler_skips_exactly_what_two_ranks_consumed():
    """2 ranks x 2 steps of 4, then one process skipping 4 batches: the epoch's samples,
    each once."""
    from torch.utils.data import DistributedSampler

    from training.data import ResumableSampler

    data = list(range(28))
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(data, 2, rank, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(0)
        seen += list(sampler)[: 2 * BATCH]
    rest = ResumableSampler(DistributedSampler(data, 1, 0, shuffle=True, seed=0, drop_last=True))
    rest.set_epoch(0)
    rest.skip = 4 * BATCH
    remaining = list(rest)
    assert len(remaining) == len(rest) == 28 - 16
    assert sorted(seen + remaining) == data
