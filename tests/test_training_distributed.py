"""The sharded class-centre softmax over 2 real processes (gloo on CPU) equals the single-process one."""

from __future__ import annotations

import os
import socket

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


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from training.losses import ArcFaceHead
    from training.partial_fc import MarginClassifier

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, y, w = _data()
        clf = MarginClassifier(ArcFaceHead(16.0, 0.4), D, C)
        assert (clf.rank, clf.world_size) == (rank, WORLD)
        clf.load_full_weight(w)
        local = x[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        loss = clf(local, y[rank * B:(rank + 1) * B])
        loss.backward()
        torch.save({"loss": loss.detach(), "x_grad": local.grad, "w_grad": clf.weight.grad,
                    "range": (clf.start, clf.end), "full": clf.full_weight()},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.barrier()  # as training.train.World.close: no rank tears down while another works
        dist.destroy_process_group()


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
        torch.testing.assert_close(got["x_grad"] / WORLD, xr.grad[rank * B:(rank + 1) * B],
                                   rtol=1e-4, atol=1e-6)
        # the gathered matrix (what checkpoints store) is the full one, in class order
        torch.testing.assert_close(got["full"], w)
    assert ranges == [(0, 6), (6, 11)]
