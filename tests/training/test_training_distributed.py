"""The sharded class-centre softmax over 2 real processes (gloo on CPU) equals the single-process
one."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import numpy as np
import pytest

from tests.conftest import require_reference

torch = require_reference("torch", "the training package's framework (train extra)")

B, D, C, WORLD = 6, 8, 11, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * B, D, generator=g)
    y = torch.randint(0, C, (WORLD * B,), generator=g)
    w = torch.randn(C, D, generator=g)
    return x, y, w


@contextmanager
def _gloo_group(rank: int, port: int):
    """This spawned process as rank ``rank`` of a ``WORLD``-process gloo group on 127.0.0.1."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.barrier()  # as training.train.World.close: no rank tears down while another works
        dist.destroy_process_group()


def _worker(rank: int, port: int, out: str) -> None:
    from training.losses import ArcFaceHead
    from training.partial_fc import MarginClassifier

    with _gloo_group(rank, port):
        x, y, w = _data()
        clf = MarginClassifier(ArcFaceHead(16.0, 0.4), D, C)
        assert (clf.rank, clf.world_size) == (rank, WORLD)
        clf.load_full_weight(w)
        local = x[rank * B : (rank + 1) * B].clone().requires_grad_(True)
        loss = clf(local, y[rank * B : (rank + 1) * B])
        loss.backward()
        torch.save(
            {
                "loss": loss.detach(),
                "x_grad": local.grad,
                "w_grad": clf.weight.grad,
                "range": (clf.start, clf.end),
                "full": clf.full_weight(),
            },
            os.path.join(out, f"rank{rank}.pt"),
        )


@pytest.mark.timeout(180)
def test_two_rank_sharded_softmax_matches_one_process(tmp_path):
    from training.losses import ArcFaceHead
    from training.partial_fc import MarginClassifier

    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    x, y, w = _data()
    ref = MarginClassifier(ArcFaceHead(16.0, 0.4), D, C, rank=0, world_size=1)
    ref.load_full_weight(w)
    xr = x.clone().requires_grad_(True)
    loss = ref(xr, y)
    loss.backward()
    ranges = []
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        start, end = got["range"]
        ranges.append((start, end))
        # identical global-batch loss on every rank
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        # each rank's centres get exactly the single-process gradient of its block
        torch.testing.assert_close(got["w_grad"], ref.weight.grad[start:end], rtol=1e-4, atol=1e-6)
        # embeddings get WORLD x the gradient, which DDP's averaging turns into the exact one
        torch.testing.assert_close(
            got["x_grad"] / WORLD, xr.grad[rank * B : (rank + 1) * B], rtol=1e-4, atol=1e-6
        )
        # the gathered matrix (what checkpoints store) is the full one, in class order
        torch.testing.assert_close(got["full"], w)
    assert ranges == [(0, 6), (6, 11)]


# ----------------------------------------------------------------- clipping and fp16 under DDP

STEPS, CLIP, IN = 4, 0.05, 10


def _step_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * B, IN, generator=g)
    y = torch.randint(0, C, (STEPS, WORLD * B), generator=g)
    w = torch.randn(C, D, generator=g)
    return x, y, w


def _model_and_optimizer(rank: int | None = None, world_size: int | None = None):
    """A small MLP backbone + sharded ArcFace centres, with the training package's optimizer."""
    import types

    from training.config import TrainConfig
    from training.losses import ArcFaceHead
    from training.partial_fc import MarginClassifier
    from training.train import build_optimizer

    torch.manual_seed(3)
    backbone = torch.nn.Sequential(torch.nn.Linear(IN, 16), torch.nn.ReLU(), torch.nn.Linear(16, D))
    clf = MarginClassifier(ArcFaceHead(16.0, 0.4), D, C, rank=rank, world_size=world_size)
    clf.load_full_weight(_step_data()[2])
    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = 0.5, 0.9, 0.0
    return (
        backbone,
        clf,
        lambda model: build_optimizer(cfg, model, types.SimpleNamespace(classifier=clf)),
    )


def _clip_worker(rank: int, port: int, out: str) -> None:
    from training.train import build_scaler, clip_and_step

    with _gloo_group(rank, port):
        x, y, _ = _step_data()
        backbone, clf, make_optimizer = _model_and_optimizer()
        model = torch.nn.parallel.DistributedDataParallel(backbone)
        optimizer = make_optimizer(model)
        norms = []
        for s in range(STEPS):
            rows = slice(rank * B, (rank + 1) * B)
            optimizer.zero_grad(set_to_none=True)
            clf(model(x[s, rows]), y[s, rows]).backward()
            norms.append(clip_and_step(optimizer, None, CLIP, WORLD))
        result = {
            "norms": norms,
            "backbone": {k: v.clone() for k, v in backbone.state_dict().items()},
            "centres": clf.full_weight(),
        }

        # fp16 scaler: a non-finite gradient in one rank's centre shard only skips the step on
        # every rank, and both ranks back off the scale identically
        scaler = build_scaler(torch.device("cpu"), WORLD)
        before = [p.detach().clone() for p in backbone.parameters()]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(clf(model(x[0, :B]), y[0, :B])).backward()
        if rank == 1:
            clf.weight.grad[0, 0] = float("inf")
        result["inf_step"] = clip_and_step(optimizer, scaler, CLIP, WORLD)
        result["unchanged"] = all(
            torch.equal(a, p) for a, p in zip(before, backbone.parameters(), strict=True)
        )
        result["scale_after_inf"] = scaler.get_scale()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(clf(model(x[1, :B]), y[1, :B])).backward()
        result["fp16_step"] = clip_and_step(optimizer, scaler, CLIP, WORLD)
        result["backbone_after_fp16"] = [p.detach().clone() for p in backbone.parameters()]
        torch.save(result, os.path.join(out, f"clip{rank}.pt"))


@pytest.mark.timeout(180)
def test_global_grad_clipping_keeps_the_backbone_replicated_and_equal_to_one_process(tmp_path):
    from training.train import clip_and_step

    torch.multiprocessing.spawn(_clip_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    got = [torch.load(tmp_path / f"clip{r}.pt", weights_only=False) for r in range(WORLD)]

    # one process on the same global batches
    x, y, _ = _step_data()
    backbone, clf, make_optimizer = _model_and_optimizer(rank=0, world_size=1)
    optimizer = make_optimizer(backbone)
    norms = []
    for s in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        clf(backbone(x[s]), y[s]).backward()
        norms.append(clip_and_step(optimizer, None, CLIP, 1))
    assert all(stepped and norm > 10 * CLIP for norm, stepped in norms)  # clipping is active

    # every rank: the same global norm, the same backbone (bit for bit), as one process gets
    assert got[0]["norms"] == got[1]["norms"]
    for (norm, stepped), (ref, _) in zip(got[0]["norms"], norms, strict=True):
        assert stepped and norm == pytest.approx(ref, rel=1e-4)
    for key, value in backbone.state_dict().items():
        assert torch.equal(got[0]["backbone"][key], got[1]["backbone"][key]), key
        torch.testing.assert_close(got[0]["backbone"][key], value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[0]["centres"], clf.full_weight(), rtol=1e-4, atol=1e-6)

    # fp16: the inf on rank 1 skipped the step on both ranks and halved both scales
    for r in range(WORLD):
        norm, stepped = got[r]["inf_step"]
        assert not stepped and not np.isfinite(norm)
        assert got[r]["unchanged"]
        assert got[r]["scale_after_inf"] == 2.0**15
        assert got[r]["fp16_step"][1]
    for a, b in zip(got[0]["backbone_after_fp16"], got[1]["backbone_after_fp16"], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(got[0]["backbone_after_fp16"][0], got[0]["backbone"]["0.weight"])


# --------------------------------------------------------------------------- center loss under DDP

CENTRE_STEPS, CENTRE_CLASSES = 3, 5


def _centre_data():
    """Per step a global batch of 2·B embeddings; class 3 only ever on rank 0's half and class 4
    only on rank 1's, classes 0-2 on both (in different numbers), so both kinds of update count."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(CENTRE_STEPS, WORLD * B, D, generator=g)
    y = torch.tensor(
        [
            [0, 0, 1, 3, 3, 2, 0, 1, 1, 2, 4, 4],
            [3, 1, 1, 2, 0, 0, 4, 0, 2, 2, 2, 1],
            [3, 3, 3, 0, 1, 2, 2, 4, 0, 1, 4, 4],
        ]
    )
    centres = torch.randn(CENTRE_CLASSES, D, generator=g)
    return x, y, centres


def _centre_worker(rank: int, port: int, out: str) -> None:
    from training.losses import CenterLoss

    with _gloo_group(rank, port):
        x, y, centres = _centre_data()
        loss_fn = CenterLoss(CENTRE_CLASSES, D, alpha=0.5)
        loss_fn.centers.copy_(centres)
        loss_fn.train()
        losses = []
        for s in range(CENTRE_STEPS):
            rows = slice(rank * B, (rank + 1) * B)
            losses.append(loss_fn(x[s, rows], y[s, rows]).item())
        torch.save(
            {"centres": loss_fn.centers.clone(), "losses": losses},
            os.path.join(out, f"centre{rank}.pt"),
        )


def _paper_centres(x, y, centres) -> list:
    """The centres before each step and after the last, by the paper's rule on the global batch:
    c_j ← c_j − α Σ_{y_i = j}(c_j − x_i) / (1 + n_j), α = 0.5, in float64."""
    out = [centres.double()]
    for s in range(CENTRE_STEPS):
        c = out[-1].clone()
        for j in range(CENTRE_CLASSES):
            members = x[s][y[s] == j].double()
            c[j] -= 0.5 * (out[-1][j] - members).sum(0) / (1 + len(members))
        out.append(c)
    return out


@pytest.mark.timeout(180)
def test_two_rank_center_loss_updates_equal_one_process_on_the_global_batch(tmp_path):
    from training.losses import CenterLoss

    torch.multiprocessing.spawn(_centre_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    got = [torch.load(tmp_path / f"centre{r}.pt", weights_only=False) for r in range(WORLD)]
    x, y, centres = _centre_data()
    want = _paper_centres(x, y, centres)
    # one process on the global batches follows the rule
    ref = CenterLoss(CENTRE_CLASSES, D, alpha=0.5)
    ref.centers.copy_(centres)
    ref.train()
    for s in range(CENTRE_STEPS):
        ref(x[s], y[s])
    torch.testing.assert_close(ref.centers.double(), want[-1], rtol=1e-5, atol=1e-6)
    for r in range(WORLD):
        # every rank ends with the one-process centres, the classes only one rank saw included
        torch.testing.assert_close(got[r]["centres"].double(), want[-1], rtol=1e-5, atol=1e-6)
        # each step's loss is that of the rank's half batch against the shared centres
        for s in range(CENTRE_STEPS):
            rows = slice(r * B, (r + 1) * B)
            expected = 0.5 * ((x[s, rows].double() - want[s][y[s, rows]]) ** 2).sum(1).mean()
            assert got[r]["losses"][s] == pytest.approx(float(expected), rel=1e-5)
