"""The class-centre matrix, sharded across ranks, with Partial-FC sampling and a distributed
softmax.

After An et al., "Partial FC: Training 10 Million Identities on a Single
Machine" (2021): rank ``r`` of ``W`` owns a contiguous block of class centres;
embeddings and labels of the whole (global) batch are gathered to every rank;
each rank scores them against a sample of its centres (all positive classes
plus random negatives, ``sample_rate`` of the block; 1.0 = the full softmax);
the softmax cross-entropy is assembled with two all-reduces (max and
sum-of-exp).  With one process every collective is skipped and this is an
ordinary (optionally sampled) fully connected softmax.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.losses import ClassificationHead
from training.losses import in_distributed_run as _distributed


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the class block owned by ``rank`` (the first ``C mod W`` ranks get one
    more)."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class MarginClassifier(nn.Module):
    """Holds this rank's class centres and turns embeddings into a margin softmax loss.

    ``head`` decides the logits (see :mod:`training.losses`).  Gradient scale:
    the all-reduce in the loss sums each rank's (identical) gradient, which
    together with DDP's averaging of backbone gradients gives the backbone the
    exact gradient of the global-batch mean loss; the centres' gradient is
    divided by the world size so that it is exact too.
    """

    def __init__(
        self,
        head: ClassificationHead,
        embedding_dim: int,
        num_classes: int,
        sample_rate: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError("sample_rate must be in (0, 1]")
        self.head = head
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.sample_rate = sample_rate
        self.rank = dist.get_rank() if rank is None and _distributed() else (rank or 0)
        self.world_size = (
            dist.get_world_size() if world_size is None and _distributed() else (world_size or 1)
        )
        self.start, self.end = shard_range(num_classes, self.rank, self.world_size)
        self.weight = nn.Parameter(torch.empty(self.end - self.start, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    # ------------------------------------------------------------------ checkpoint helpers
    @torch.no_grad()
    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """A per-centre tensor (this rank's rows, e.g. the centres or their optimizer moments)
        gathered from every rank into (C, ...) in class order; every rank must call."""
        if not _distributed():
            return local.detach().clone().cpu()
        sizes = [shard_range(self.num_classes, r, self.world_size) for r in range(self.world_size)]
        biggest = max(e - s for s, e in sizes)
        padded = local.new_zeros((biggest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: e - s] for p, (s, e) in zip(parts, sizes, strict=True)]).cpu()

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's block of a (C, ...) tensor saved under any world size."""
        if full.shape[0] != self.num_classes:
            raise ValueError(f"{full.shape[0]} class rows, the classifier has {self.num_classes}")
        return full[self.start : self.end]

    def full_weight(self) -> torch.Tensor:
        """All class centres (C, d), gathered from every rank (rank order = class order)."""
        return self.gather_rows(self.weight)

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        """Take this rank's block of a (C, d) matrix saved under any world size."""
        if full.shape != (self.num_classes, self.embedding_dim):
            raise ValueError(
                f"class-centre matrix {tuple(full.shape)} does not match "
                f"({self.num_classes}, {self.embedding_dim})"
            )
        self.weight.copy_(self.local_rows(full).to(self.weight.device))

    # ------------------------------------------------------------------ forward
    def _gather(self, embeddings: torch.Tensor, labels: torch.Tensor):
        if not _distributed():
            return embeddings, labels
        from torch.distributed.nn.functional import all_gather as all_gather_grad

        all_emb = torch.cat(all_gather_grad(embeddings.contiguous()))
        all_lab = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(all_lab, labels.contiguous())
        return all_emb, torch.cat(all_lab)

    def _sample(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(index of sampled local centres or None, labels remapped into the sample;
        -1 = not here)."""
        local = (labels >= self.start) & (labels < self.end)
        local_labels = torch.where(local, labels - self.start, torch.full_like(labels, -1))
        num_local = self.end - self.start
        num_sample = max(1, math.ceil(self.sample_rate * num_local))
        if num_sample >= num_local:
            return None, local_labels
        positives = torch.unique(local_labels[local])
        num_sample = max(num_sample, positives.numel())
        scores = torch.rand(num_local, device=labels.device)
        scores[positives] = 2.0
        index = torch.topk(scores, num_sample).indices.sort().values
        remap = torch.full((num_local,), -1, dtype=torch.long, device=labels.device)
        remap[index] = torch.arange(num_sample, device=labels.device)
        mapped = torch.where(local, remap[local_labels.clamp_min(0)], local_labels)
        return index, mapped

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean softmax cross-entropy over the global batch (identical on every rank)."""
        embeddings, labels = self._gather(embeddings, labels)
        index, local_labels = self._sample(labels)
        weight = self.weight if index is None else self.weight[index]
        if self.world_size > 1:
            weight = _ScaleGrad.apply(weight, 1.0 / self.world_size)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x, w = embeddings.float(), weight.float()
            feat_norm = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            weight_norm = w.norm(dim=1).clamp_min(1e-12).unsqueeze(0)
            cos = (x / feat_norm) @ (w / weight_norm.T).T
            logits = self.head(cos, local_labels, feat_norm, weight_norm)
            return distributed_cross_entropy(logits, local_labels)


def distributed_cross_entropy(logits: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy whose classes are split over ranks (``-1`` = label on another rank)."""
    if not _distributed():
        return F.cross_entropy(logits, local_labels)
    from torch.distributed.nn.functional import all_reduce as all_reduce_grad

    row_max = logits.detach().max(dim=1, keepdim=True).values
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    sum_exp = all_reduce_grad(torch.exp(logits - row_max).sum(dim=1))
    here = local_labels >= 0
    target = torch.zeros(logits.shape[0], device=logits.device, dtype=logits.dtype)
    target = target.index_put(
        (torch.nonzero(here, as_tuple=True)[0],), logits[here, local_labels[here]]
    )
    target = all_reduce_grad(target)
    return (torch.log(sum_exp) + row_max.squeeze(1) - target).mean()
