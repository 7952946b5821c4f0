"""Every loss the project trains with, one module.

Two kinds live here:

*Classification heads* turn the cosine between an embedding ``x`` and each
class centre ``W_j`` into logits for a softmax cross-entropy.  They all receive
the same four tensors from :class:`training.partial_fc.MarginClassifier` —
``cos`` (B, C), ``labels`` (B,; ``-1`` where the true class is not among the
columns), ``feat_norm`` = ‖x‖ (B, 1) and ``weight_norm`` = ‖W_j‖ (1, C) — so
the same head works with a full softmax and with Partial-FC sampled centres
sharded across ranks.  Every head computes in float32 with autocast disabled:
the margin arithmetic (``acos`` near ±1, ``s·cos`` with s = 64) is where fp16
and bf16 produce the NaNs this field is known for.

*Metric losses* work on the embeddings directly: center loss, triplet loss
(online batch-hard and semi-hard mining) and marginal loss.

The angular target function
---------------------------
All multiplicative / additive angular margins use one monotonic function of
θ = arccos(cos), the generalisation of SphereFace's ψ to the combined margin
of ArcFace's paper (Deng et al., 2019, eq. 4)::

    φ = m1·θ + m2,   k = ⌊φ / π⌋,   ψ(θ) = (-1)^k · cos(φ) − 2k − m3

For φ ≤ π this is exactly ``cos(m1·θ + m2) − m3``; beyond π the piecewise
continuation keeps ψ continuous and strictly decreasing on [0, π], so a larger
angle is always penalised (this is SphereFace's construction, and covers
ArcFace's θ + m > π case and every m1 ≠ 1 combination without exceptions).
For an integer m1 with m2 = 0, cos(m1·θ) is evaluated as the Chebyshev
polynomial T_m1(cos θ) as in L-Softmax/SphereFace, which has finite gradients
everywhere; otherwise θ comes from ``acos`` of the cosine clamped to
[-1 + ε, 1 − ε], so gradients stay finite at θ ≈ 0 and θ ≈ π.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HEADS",
    "METRIC_LOSSES",
    "ArcFaceHead",
    "CenterLoss",
    "ClassificationHead",
    "CombinedMarginHead",
    "CosFaceHead",
    "L2SoftmaxHead",
    "LSoftmaxHead",
    "LambdaSchedule",
    "MarginalLoss",
    "NormFaceHead",
    "SoftmaxHead",
    "SphereFaceHead",
    "TripletLoss",
    "build_head",
    "in_distributed_run",
    "l2_softmax_alpha_lower_bound",
    "margin_psi",
]

_ACOS_EPS = 1e-6


def in_distributed_run() -> bool:
    """Whether this process is one rank of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _autocast_off(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def chebyshev_cos_multiple(cos: torch.Tensor, m: int) -> torch.Tensor:
    """cos(m·θ) as the Chebyshev polynomial T_m(cos θ): T0 = 1, T1 = c,
    T_{n+1} = 2c·T_n − T_{n-1}."""
    t_prev, t_cur = torch.ones_like(cos), cos
    if m == 0:
        return t_prev
    for _ in range(m - 1):
        t_prev, t_cur = t_cur, 2 * cos * t_cur - t_prev
    return t_cur


def margin_psi(
    cos: torch.Tensor, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0
) -> torch.Tensor:
    """The monotonic target logit ψ(θ) = (-1)^k cos(m1·θ + m2) − 2k − m3 (see module docstring).

    ``cos`` must already be float32 (or float64) and in [-1, 1].
    """
    if m1 == 1.0 and m2 == 0.0:
        return cos - m3  # CosFace / NormFace: no angle needed, gradient exactly 1
    if float(m1).is_integer() and m2 == 0.0:
        m = int(m1)
        # k = ⌊mθ/π⌋ counts the thresholds cos(jπ/m) that cos θ has fallen to (no gradient).
        k = torch.zeros_like(cos)
        for j in range(1, m + 1):
            k = k + (cos <= math.cos(j * math.pi / m)).to(cos.dtype)
        k = k.clamp(max=m - 1) if m > 0 else k
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        return sign * chebyshev_cos_multiple(cos, m) - 2.0 * k - m3
    theta = torch.acos(cos.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
    phi = m1 * theta + m2
    k = torch.floor(phi.detach() / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)
    return sign * torch.cos(phi) - 2.0 * k - m3


def l2_softmax_alpha_lower_bound(num_classes: int, p: float = 0.9) -> float:
    """Ranjan et al. (2017), eq. 5: α_low = log(p·(C − 2) / (1 − p)).

    The smallest feature norm α for which a softmax over ``num_classes`` classes
    can reach probability ``p`` for the true class at its best.
    """
    if num_classes < 3:
        raise ValueError("the L2-softmax bound needs at least 3 classes")
    if not 0.0 < p < 1.0:
        raise ValueError("p must lie in (0, 1)")
    return math.log(p * (num_classes - 2) / (1.0 - p))


@dataclass
class LambdaSchedule:
    """SphereFace / L-Softmax annealing of λ (Liu et al. 2017, Caffe ``MarginInnerProduct``).

    λ(t) = max(λ_min, base · (1 + γ·t)^(−power)); the target logit is
    (λ·‖x‖cos θ + ‖x‖ψ(θ)) / (1 + λ), so training starts as plain softmax and
    the margin is phased in.  ``base = 0`` disables annealing (pure margin).
    """

    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    lambda_min: float = 5.0

    def __call__(self, iteration: int) -> float:
        if self.base <= 0:
            return 0.0
        return max(self.lambda_min, self.base * (1.0 + self.gamma * iteration) ** (-self.power))


class ClassificationHead(nn.Module):
    """Maps (cos, labels, ‖x‖, ‖W‖) to softmax logits.  Subclasses define ``target``/``scale``.

    ``labels == -1`` marks rows whose class is not among the columns (Partial FC
    on another rank): those rows get no margin.
    """

    #: paper citation and formula, shown by ``facegate-train losses``
    formula = ""

    def scale(self, feat_norm: torch.Tensor, weight_norm: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, cos: torch.Tensor, feat_norm: torch.Tensor) -> torch.Tensor:
        """The target-class cosine replacement ψ (before scaling), for rows' true classes."""
        return cos

    def forward(
        self,
        cos: torch.Tensor,
        labels: torch.Tensor,
        feat_norm: torch.Tensor,
        weight_norm: torch.Tensor,
    ) -> torch.Tensor:
        with _autocast_off(cos.device.type):
            cos = cos.float().clamp(-1.0, 1.0)
            feat_norm, weight_norm = feat_norm.float(), weight_norm.float()
            rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
            cols = labels[rows]
            cos_target = cos[rows, cols]
            new_target = self.target(cos_target, feat_norm[rows, 0])
            adjusted = cos.index_put((rows, cols), new_target)
            self._advance()
            return adjusted * self.scale(feat_norm, weight_norm)

    def _advance(self) -> None:
        """Per-step state (annealing); called once per forward pass in training mode."""


class SoftmaxHead(ClassificationHead):
    """Softmax cross-entropy: logit_j = W_jᵀx = ‖W_j‖‖x‖cos θ_j (bias-free, as in the margin
    papers)."""

    formula = "logit_j = ||W_j|| ||x|| cos(theta_j)"

    def scale(self, feat_norm, weight_norm):
        return feat_norm * weight_norm


class L2SoftmaxHead(ClassificationHead):
    """L2-constrained softmax (Ranjan, Castillo, Chellappa 2017): ‖x‖ fixed to α.

    logit_j = α‖W_j‖cos θ_j.  Pick α ≥ :func:`l2_softmax_alpha_lower_bound`.
    """

    formula = "logit_j = alpha ||W_j|| cos(theta_j);  alpha >= log(p (C-2) / (1-p))"

    def __init__(self, alpha: float = 16.0):
        super().__init__()
        if alpha <= 0:
            raise ValueError("alpha must be positive")
        self.alpha = float(alpha)

    def scale(self, feat_norm, weight_norm):
        return self.alpha * weight_norm


class _AnnealedHead(ClassificationHead):
    """Shared by L-Softmax and SphereFace: ψ_m with λ annealing, counted in a saved buffer."""

    iteration: torch.Tensor  # registered buffer

    def __init__(self, m: int, schedule: LambdaSchedule | None):
        super().__init__()
        if int(m) != m or m < 1:
            raise ValueError(f"the multiplicative margin m must be a positive integer, got {m}")
        self.m = int(m)
        self.schedule = schedule or LambdaSchedule(base=0.0)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @property
    def current_lambda(self) -> float:
        return self.schedule(int(self.iteration))

    def target(self, cos, feat_norm):
        lam = self.current_lambda
        return (lam * cos + margin_psi(cos, float(self.m))) / (1.0 + lam)

    def _advance(self):
        if self.training:
            self.iteration += 1


class LSoftmaxHead(_AnnealedHead):
    """Large-margin softmax (Liu, Wen, Yu, Yang 2016), weights and features not normalised.

    target = ‖W_y‖‖x‖ψ(θ_y), ψ(θ) = (-1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m], m integer,
    blended with the plain logit by λ (the paper's β) annealing.
    """

    formula = "target = ||W_y|| ||x|| (lambda cos + psi_m(theta)) / (1 + lambda)"

    def __init__(self, m: int = 4, schedule: LambdaSchedule | None = None):
        super().__init__(m, schedule if schedule is not None else LambdaSchedule())

    def scale(self, feat_norm, weight_norm):
        return feat_norm * weight_norm


class SphereFaceHead(_AnnealedHead):
    """A-Softmax (Liu et al., SphereFace, 2017): ‖W_j‖ = 1, multiplicative angular margin m.

    logit_j = f·cos θ_j, target = f·(λ cos θ_y + ψ_m(θ_y)) / (1 + λ), with f = ‖x‖
    (the paper) or a fixed scale ``s`` (the normalised variant, as in the combined margin).
    """

    formula = "target = ||x|| (lambda cos + psi_m(theta)) / (1 + lambda);  ||W|| = 1"

    def __init__(self, m: int = 4, schedule: LambdaSchedule | None = None, s: float | None = None):
        super().__init__(m, schedule if schedule is not None else LambdaSchedule())
        self.s = None if s is None else float(s)

    def scale(self, feat_norm, weight_norm):
        return feat_norm if self.s is None else torch.full_like(feat_norm, self.s)


class NormFaceHead(ClassificationHead):
    """NormFace (Wang et al. 2017): weights and features normalised, logit_j = s·cos θ_j."""

    formula = "logit_j = s cos(theta_j)"

    def __init__(self, s: float = 30.0):
        super().__init__()
        self.s = float(s)

    def scale(self, feat_norm, weight_norm):
        return torch.full_like(feat_norm, self.s)


class CombinedMarginHead(ClassificationHead):
    """Combined margin (Deng et al., ArcFace, 2019, eq. 4): target = s·ψ(θ_y) with m1, m2, m3.

    ψ = cos(m1·θ + m2) − m3 on its monotonic range, continued piecewise beyond
    (see :func:`margin_psi`).  (m1, 0, 0) is normalised SphereFace, (1, m, 0)
    ArcFace, (1, 0, m) CosFace, (1, 0, 0) NormFace; any mixture is supported.
    """

    formula = "target = s (cos(m1 theta + m2) - m3), monotone continuation past pi"

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0):
        super().__init__()
        if s <= 0:
            raise ValueError("scale s must be positive")
        if m1 <= 0:
            raise ValueError(f"m1 must be positive (1 = no multiplicative margin), got {m1}")
        if m2 < 0 or m3 < 0:
            raise ValueError(f"m2 and m3 are margins and must be >= 0, got m2={m2}, m3={m3}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)

    def target(self, cos, feat_norm):
        return margin_psi(cos, self.m1, self.m2, self.m3)

    def scale(self, feat_norm, weight_norm):
        return torch.full_like(feat_norm, self.s)


class CosFaceHead(CombinedMarginHead):
    """CosFace / LMCL (Wang et al. 2018), = AM-Softmax (Wang et al. 2018):
    target = s·(cos θ_y − m)."""

    formula = "target = s (cos(theta_y) - m)"

    def __init__(self, s: float = 64.0, m: float = 0.35):
        super().__init__(s=s, m1=1.0, m2=0.0, m3=m)


class ArcFaceHead(CombinedMarginHead):
    """ArcFace (Deng et al. 2019): target = s·cos(θ_y + m), continued monotonically for
    θ + m > π."""

    formula = "target = s cos(theta_y + m)"

    def __init__(self, s: float = 64.0, m: float = 0.5):
        super().__init__(s=s, m1=1.0, m2=m, m3=0.0)


# --------------------------------------------------------------------------- metric losses


class CenterLoss(nn.Module):
    """Center loss (Wen, Zhang, Li, Qiao 2016): L_C = ½·mean_i ‖x_i − c_{y_i}‖².

    Used with a softmax head (L = L_S + λ·L_C).  The centres are not learned by
    the optimiser: each training step moves them by the paper's rule
    Δc_j = Σ_{i: y_i = j}(c_j − x_i) / (1 + n_j),  c_j ← c_j − α·Δc_j.
    Under DDP the sums and the counts n_j are all-reduced over the ranks before
    the update, so every rank applies the update of the global batch and the
    (replicated) centres stay equal to those of one process on that batch.
    """

    centers: torch.Tensor  # registered buffer

    def __init__(self, num_classes: int, embedding_dim: int, alpha: float = 0.5):
        super().__init__()
        if not 0.0 < alpha <= 1.0:
            raise ValueError("center update rate alpha must be in (0, 1]")
        self.alpha = float(alpha)
        self.register_buffer("centers", torch.zeros(num_classes, embedding_dim))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with _autocast_off(embeddings.device.type):
            x = embeddings.float()
            centers = self.centers[labels]
            loss = 0.5 * (x - centers).pow(2).sum(dim=1).mean()
            if self.training:
                self._update(x.detach(), labels)
            return loss

    @torch.no_grad()
    def _update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        diff = torch.zeros_like(self.centers).index_add_(0, labels, self.centers[labels] - x)
        counts = torch.zeros(self.centers.shape[0], device=x.device).index_add_(
            0, labels, torch.ones_like(labels, dtype=torch.float32)
        )
        if in_distributed_run():
            dist.all_reduce(diff)
            dist.all_reduce(counts)
        self.centers -= self.alpha * diff / (1.0 + counts).unsqueeze(1)


def _pairwise_sq_dist(x: torch.Tensor) -> torch.Tensor:
    sq = x.pow(2).sum(dim=1, keepdim=True)
    return (sq + sq.T - 2.0 * x @ x.T).clamp_min(0.0)


class TripletLoss(nn.Module):
    """Triplet loss (Schroff, Kalenichenko, Philbin, FaceNet 2015) with online mining.

    L = mean over anchors of [‖f(a) − f(p)‖² − ‖f(a) − f(n)‖² + α]₊ on
    L2-normalised embeddings (squared distances, FaceNet's α = 0.2 by default).
    ``mining="batch_hard"`` (Hermans et al. 2017) takes each anchor's farthest
    positive and nearest negative.  ``mining="semi_hard"`` (FaceNet, section 3.2)
    uses every anchor-positive pair with a semi-hard negative, one with
    d(a,p) < d(a,n) < d(a,p) + α, the nearest of them.  Without one, the rule of
    TensorFlow Addons' ``triplet_semihard_loss``: the nearest negative farther
    than the positive (it lies beyond the band, so the term is 0: the triplet
    already meets the margin), or, when no negative is farther than the
    positive, the farthest negative.  The mean runs over all anchor-positive
    pairs, zero terms included, as in that reference.  Batches must hold ≥ 2
    images of some identity (a P×K sampler).
    """

    def __init__(self, margin: float = 0.2, mining: str = "batch_hard"):
        super().__init__()
        if mining not in ("batch_hard", "semi_hard"):
            raise ValueError(f"unknown triplet mining {mining!r}: use batch_hard or semi_hard")
        self.margin, self.mining = float(margin), mining

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with _autocast_off(embeddings.device.type):
            x = F.normalize(embeddings.float(), dim=1)
            d = _pairwise_sq_dist(x)
            same = labels.unsqueeze(0) == labels.unsqueeze(1)
            eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
            pos_mask, neg_mask = same & ~eye, ~same
            if not pos_mask.any() or not neg_mask.any():
                raise ValueError(
                    "a triplet batch needs at least one positive pair and one negative"
                )
            big = torch.finfo(d.dtype).max / 4
            if self.mining == "batch_hard":
                hardest_pos = torch.where(pos_mask, d, torch.zeros_like(d)).max(dim=1).values
                hardest_neg = torch.where(neg_mask, d, torch.full_like(d, big)).min(dim=1).values
                valid = pos_mask.any(dim=1)
                losses = F.relu(hardest_pos - hardest_neg + self.margin)[valid]
                return losses.mean()
            a_idx, p_idx = torch.nonzero(pos_mask, as_tuple=True)
            d_ap = d[a_idx, p_idx].unsqueeze(1)
            d_an = d[a_idx]
            negs = neg_mask[a_idx]
            farther = negs & (d_an > d_ap)  # the semi-hard ones, and those beyond the margin
            nearest_farther = torch.where(farther, d_an, torch.full_like(d_an, big)).min(1).values
            farthest = torch.where(negs, d_an, torch.full_like(d_an, -1.0)).max(1).values
            chosen = torch.where(farther.any(dim=1), nearest_farther, farthest)
            return F.relu(d_ap.squeeze(1) - chosen + self.margin).mean()


class MarginalLoss(nn.Module):
    """Marginal loss (Deng, Zhou, Zafeiriou 2017).

    L_M = 1/(m² − m) Σ_{i≠j} [ξ − y_ij·(θ − ‖x̂_i − x̂_j‖²)]₊ over a batch of m
    L2-normalised features, y_ij = +1 for the same identity and −1 otherwise,
    θ the distance threshold and ξ the error margin.  Used with softmax
    (L = L_S + λ·L_M).
    """

    def __init__(self, theta: float = 1.2, xi: float = 0.3):
        super().__init__()
        self.theta, self.xi = float(theta), float(xi)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with _autocast_off(embeddings.device.type):
            x = F.normalize(embeddings.float(), dim=1)
            m = x.shape[0]
            if m < 2:
                raise ValueError("marginal loss needs at least two samples")
            d = _pairwise_sq_dist(x)
            y = (labels.unsqueeze(0) == labels.unsqueeze(1)).float() * 2.0 - 1.0
            off = ~torch.eye(m, dtype=torch.bool, device=x.device)
            hinge = F.relu(self.xi - y * (self.theta - d))
            return hinge[off].sum() / (m * m - m)


#: classification heads by name: the constructors' keyword arguments are the papers' names
HEADS: dict[str, type[ClassificationHead]] = {
    "softmax": SoftmaxHead,
    "l2softmax": L2SoftmaxHead,
    "lsoftmax": LSoftmaxHead,
    "normface": NormFaceHead,
    "sphereface": SphereFaceHead,
    "cosface": CosFaceHead,
    "arcface": ArcFaceHead,
    "combined": CombinedMarginHead,
}

#: metric losses by name
METRIC_LOSSES: dict[str, type[nn.Module]] = {
    "center": CenterLoss,
    "triplet": TripletLoss,
    "marginal": MarginalLoss,
}


def build_head(name: str, **params) -> ClassificationHead:
    """A classification head from its name and paper-named parameters (clear error otherwise)."""
    if name not in HEADS:
        raise ValueError(f"unknown classification loss {name!r}; known: {', '.join(HEADS)}")
    params = dict(params)
    if name in ("lsoftmax", "sphereface") and isinstance(params.get("schedule"), dict):
        params["schedule"] = LambdaSchedule(**params["schedule"])
    try:
        return HEADS[name](**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for loss {name!r}: {exc}") from None
