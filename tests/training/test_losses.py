"""The margin and metric losses against references written from their papers' formulas.

Every reference below is computed in float64 from the paper's equation (angles by ``arccos``,
norms and inner products by hand), without calling :mod:`training.losses`; autograd of the
reference gives the reference gradients.  The losses compute in float32, hence the
tolerances.  Each head is checked through :class:`training.partial_fc.MarginClassifier`, the
way training uses it: the logits, the loss and the gradients with respect to the embeddings
and to the class centres.
"""

from __future__ import annotations

import math

import pytest

from tests.conftest import require_reference

torch = require_reference("torch", "the training package's framework (train extra)")

import torch.nn.functional as F  # noqa: E402

from training import losses as L  # noqa: E402
from training.partial_fc import MarginClassifier, shard_range  # noqa: E402

# --------------------------------------------------------------------- the papers' formulas


def _sign(k: torch.Tensor) -> torch.Tensor:
    return 1.0 - 2.0 * torch.remainder(k, 2)


def psi_multiplicative(theta: torch.Tensor, m: int) -> torch.Tensor:
    """L-Softmax (Liu et al. 2016, eq. 6) and SphereFace (Liu et al. 2017, eq. 6):
    ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m], k ∈ [0, m − 1]."""
    k = torch.clamp(torch.floor(theta.detach() * m / math.pi), max=m - 1)
    return _sign(k) * torch.cos(m * theta) - 2.0 * k


def psi_combined(theta: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """ArcFace paper, eq. 4: cos(m1·θ + m2) − m3 while m1·θ + m2 <= π; beyond π, continued as
    SphereFace continues cos(mθ): (−1)^k cos(φ) − 2k − m3 with k = ⌊φ/π⌋ (what training.losses
    documents it implements, in place of InsightFace's threshold / easy-margin switch)."""
    phi = m1 * theta + m2
    k = torch.floor(phi.detach() / math.pi)
    return _sign(k) * torch.cos(phi) - 2.0 * k - m3


def lambda_at(iteration: int, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0) -> float:
    """SphereFace's Caffe MarginInnerProduct: λ = max(λ_min, base·(1 + γ·iter)^(−power))."""
    return max(lambda_min, base * (1.0 + gamma * iteration) ** (-power))


def reference_logits(kind: str, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, **p):
    """Logits of each paper for embeddings ``x`` (B, d), class weights ``w`` (C, d), labels ``y``.

    softmax: W_jᵀx.  L2-softmax (Ranjan et al. 2017): W_jᵀ(α x/‖x‖).  NormFace (Wang et al.
    2017): s·cos θ_j.  CosFace (Wang et al. 2018): target s·(cos θ_y − m).  ArcFace (Deng et al.
    2019): target s·cos(θ_y + m).  Combined (ArcFace eq. 4): target s·(cos(m1 θ_y + m2) − m3).
    SphereFace (‖W‖ = 1): ‖x‖ cos θ_j (or s cos θ_j), target ‖x‖ (λ cos θ_y + ψ(θ_y)) / (1 + λ).
    L-Softmax: ‖W_j‖‖x‖ cos θ_j, target ‖W_y‖‖x‖ (λ cos θ_y + ψ(θ_y)) / (1 + λ).
    """
    x_norm = torch.sqrt((x * x).sum(1, keepdim=True))
    w_norm = torch.sqrt((w * w).sum(1))
    cos = (x @ w.T) / x_norm / w_norm
    rows = torch.arange(len(y))
    cos_y = cos[rows, y]
    theta_y = torch.acos(cos_y)
    lam = p.get("lam", 0.0)
    if kind == "softmax":
        return x @ w.T
    if kind == "l2softmax":
        return (p["alpha"] * x / x_norm) @ w.T
    if kind == "normface":
        return p["s"] * cos
    if kind == "cosface":
        base, target = p["s"] * cos, p["s"] * (cos_y - p["m"])
    elif kind == "arcface":
        base, target = p["s"] * cos, p["s"] * psi_combined(theta_y, 1.0, p["m"], 0.0)
    elif kind == "combined":
        base = p["s"] * cos
        target = p["s"] * psi_combined(theta_y, p["m1"], p["m2"], p["m3"])
    elif kind == "sphereface":
        f = x_norm[:, 0] if p.get("s") is None else torch.full_like(cos_y, p["s"])
        base = f[:, None] * cos
        target = f * (lam * cos_y + psi_multiplicative(theta_y, p["m"])) / (1 + lam)
    elif kind == "lsoftmax":
        base = x @ w.T
        scale = x_norm[:, 0] * w_norm[y]
        target = scale * (lam * cos_y + psi_multiplicative(theta_y, p["m"])) / (1 + lam)
    else:
        raise AssertionError(kind)
    one_hot = F.one_hot(y, w.shape[0]).bool()
    return torch.where(one_hot, target[:, None].expand_as(base), base)


def _case(b=24, c=7, d=8, seed=0):
    """Embeddings whose angle to their class centre spans [0, π]: x = a·W_y + noise with a from
    +3 (θ near 0) through 0 (θ near π/2) to −3 (θ near π), norms between about 1 and 10."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    a = torch.linspace(3, -3, b, dtype=torch.float64)[:, None]
    x = a * w[y] + 0.6 * torch.randn(b, d, generator=g, dtype=torch.float64)
    return x, w.float().double(), y  # centres as the float32 parameter will hold them


def _check_head(head, kind, params, seed=0, train_steps=0):
    """The head's logits, loss and gradients (through MarginClassifier) against the reference."""
    x, w, y = _case(seed=seed)
    clf = MarginClassifier(head, x.shape[1], w.shape[0], rank=0, world_size=1)
    clf.load_full_weight(w.float())
    clf.train(train_steps > 0)
    with torch.no_grad():
        for _ in range(train_steps):  # λ annealing: each training forward advances the schedule
            clf(x, y)
    # forward values: the head's logits from the reference's own cosines and norms
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref_logits = reference_logits(kind, xr, wr, y, **params)
    with torch.no_grad():
        x_norm, w_norm = x.norm(dim=1, keepdim=True), w.norm(dim=1).unsqueeze(0)
        cos = (x / x_norm) @ (w / w_norm.T).T
        was_training = head.training
        head.eval()  # (no schedule step for this look)
        logits = head(cos, y, x_norm, w_norm).double()
        head.train(was_training)
    scale = float(ref_logits.detach().abs().max())
    torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-5, atol=2e-6 * scale)
    # loss and gradients
    ref_loss = F.cross_entropy(ref_logits, y)
    ref_loss.backward()
    xt = x.clone().requires_grad_(True)
    loss = clf(xt, y)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-4, atol=1e-6 * scale)
    torch.testing.assert_close(clf.weight.grad.double(), wr.grad, rtol=1e-4, atol=1e-6 * scale)


HEAD_CASES = [
    ("softmax", lambda: L.SoftmaxHead(), "softmax", {}),
    ("l2softmax", lambda: L.L2SoftmaxHead(alpha=12.0), "l2softmax", {"alpha": 12.0}),
    ("normface", lambda: L.NormFaceHead(s=30.0), "normface", {"s": 30.0}),
    ("cosface", lambda: L.CosFaceHead(s=30.0, m=0.35), "cosface", {"s": 30.0, "m": 0.35}),
    ("arcface", lambda: L.ArcFaceHead(s=30.0, m=0.5), "arcface", {"s": 30.0, "m": 0.5}),
    ("arcface-m0.8", lambda: L.ArcFaceHead(s=16.0, m=0.8), "arcface", {"s": 16.0, "m": 0.8}),
    (
        "sphereface-m4",
        lambda: L.SphereFaceHead(4, schedule=L.LambdaSchedule(base=0.0)),
        "sphereface",
        {"m": 4},
    ),
    (
        "sphereface-m3-s30",
        lambda: L.SphereFaceHead(3, schedule=L.LambdaSchedule(base=0.0), s=30.0),
        "sphereface",
        {"m": 3, "s": 30.0},
    ),
    (
        "lsoftmax-m2",
        lambda: L.LSoftmaxHead(2, schedule=L.LambdaSchedule(base=0.0)),
        "lsoftmax",
        {"m": 2},
    ),
    (
        "lsoftmax-m4",
        lambda: L.LSoftmaxHead(4, schedule=L.LambdaSchedule(base=0.0)),
        "lsoftmax",
        {"m": 4},
    ),
    (
        "combined-cm1",
        lambda: L.CombinedMarginHead(30.0, 1.0, 0.3, 0.2),
        "combined",
        {"s": 30.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
    ),
    (
        "combined-mixed",
        lambda: L.CombinedMarginHead(30.0, 1.35, 0.25, 0.1),
        "combined",
        {"s": 30.0, "m1": 1.35, "m2": 0.25, "m3": 0.1},
    ),
    (
        "combined-m1-below-1",
        lambda: L.CombinedMarginHead(30.0, 0.9, 0.4, 0.15),
        "combined",
        {"s": 30.0, "m1": 0.9, "m2": 0.4, "m3": 0.15},
    ),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,make,kind,params", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_head_logits_loss_and_gradients_match_the_paper(name, make, kind, params, seed):
    _check_head(make(), kind, params, seed=seed)


def test_the_cases_cover_every_branch_of_the_piecewise_targets():
    # θ_y of the test embeddings spans (0, π): ArcFace's θ + m > π continuation and all four
    # pieces k = 0..3 of SphereFace's ψ with m = 4 are exercised by the comparisons above
    for seed in (0, 1):
        x, w, y = _case(seed=seed)
        cos = F.cosine_similarity(x, w[y])
        theta = torch.acos(cos)
        assert int((theta + 0.5 > math.pi).sum()) >= 2
        assert set(torch.floor(theta * 4 / math.pi).long().tolist()) == {0, 1, 2, 3}


# combined margin (m1, m2, m3) against the named losses' own formulas, written independently
COMBINED_AS = [
    ("cosface", (64.0, 1.0, 0.0, 0.35), "cosface", {"s": 64.0, "m": 0.35}),
    ("arcface", (64.0, 1.0, 0.5, 0.0), "arcface", {"s": 64.0, "m": 0.5}),
    ("normface", (64.0, 1.0, 0.0, 0.0), "normface", {"s": 64.0}),
    ("sphereface-m2", (32.0, 2.0, 0.0, 0.0), "sphereface", {"m": 2, "s": 32.0}),
    ("sphereface-m4", (32.0, 4.0, 0.0, 0.0), "sphereface", {"m": 4, "s": 32.0}),
]


@pytest.mark.parametrize("name,smm,kind,params", COMBINED_AS, ids=[c[0] for c in COMBINED_AS])
def test_combined_margin_equals_cosface_arcface_normface_and_sphereface(name, smm, kind, params):
    _check_head(L.CombinedMarginHead(*smm), kind, params)


def test_the_named_references_differ_so_the_comparisons_are_not_vacuous():
    x, w, y = _case()
    arc = reference_logits("arcface", x, w, y, s=64.0, m=0.5)
    cos = reference_logits("cosface", x, w, y, s=64.0, m=0.35)
    sphere = reference_logits("sphereface", x, w, y, m=4, s=64.0)
    plain = reference_logits("normface", x, w, y, s=64.0)
    for a, b in [(arc, cos), (arc, sphere), (cos, sphere), (arc, plain), (cos, plain)]:
        assert (a - b).abs().max() > 1.0


@pytest.mark.parametrize(
    "head_cls,kind", [(L.SphereFaceHead, "sphereface"), (L.LSoftmaxHead, "lsoftmax")]
)
def test_lambda_annealing_as_implemented(head_cls, kind):
    # λ(t) = max(5, 1000·(1 + 0.12 t)^−1): after 3 training steps λ = 1000/1.36 = 735.3;
    # the target blends the plain logit and the margin one by λ
    schedule = L.LambdaSchedule(base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0)
    head = head_cls(4, schedule=schedule)
    _check_head(head, kind, {"m": 4, "lam": lambda_at(3)}, train_steps=3)
    assert int(head.iteration) == 4  # the compared training forward was step 3
    assert head.current_lambda == pytest.approx(1000.0 / (1 + 0.12 * 4))
    # late in training the floor λ_min = 5 holds; power 2 decays faster
    head = head_cls(
        4, schedule=L.LambdaSchedule(base=1000.0, gamma=0.12, power=2.0, lambda_min=5.0)
    )
    head.iteration.fill_(40)
    lam = lambda_at(40, power=2.0)
    assert lam == pytest.approx(1000.0 / (1 + 0.12 * 40) ** 2)
    _check_head(head, kind, {"m": 4, "lam": lam})
    head.iteration.fill_(10**5)
    assert head.current_lambda == 5.0
    _check_head(head, kind, {"m": 4, "lam": 5.0})
    with pytest.raises(ValueError):
        L.SphereFaceHead(m=1.5)


@pytest.mark.parametrize(
    "m1,m2,m3",
    [
        (1, 0.5, 0),
        (1, 0, 0.35),
        (1, 0.3, 0.2),
        (1.35, 0.25, 0.1),
        (2, 0, 0),
        (4, 0, 0),
        (0.9, 0.4, 0.15),
    ],
)
def test_margin_psi_is_the_formula_monotone_and_continuous(m1, m2, m3):
    cos = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    psi = L.margin_psi(cos, m1, m2, m3)
    interior = cos.abs() < 1 - 1e-4  # the code clamps acos' argument to 1 − 1e-6 at the ends
    want = psi_combined(torch.acos(cos), m1, m2, m3)
    torch.testing.assert_close(psi[interior], want[interior], rtol=0, atol=1e-9)
    torch.testing.assert_close(psi, want, rtol=0, atol=2e-3)
    # ψ is non-increasing in θ, i.e. non-decreasing in cos; continuous (no jumps on a fine grid)
    assert torch.all(torch.diff(psi) >= -1e-9)
    assert torch.max(torch.abs(torch.diff(psi))) < 0.05


@pytest.mark.parametrize("classes", [10, 1000, 13403, 100_000])
def test_l2_softmax_alpha_lower_bound_reaches_probability_p(classes):
    p = 0.9
    alpha = L.l2_softmax_alpha_lower_bound(classes, p)
    assert alpha == pytest.approx(math.log(p * (classes - 2) / (1 - p)))
    # Ranjan et al.: the best achievable true-class probability with norm α on C classes
    best = math.exp(alpha) / (math.exp(alpha) + (classes - 2) + math.exp(-alpha))
    assert best == pytest.approx(p, abs=1e-3)
    with pytest.raises(ValueError):
        L.l2_softmax_alpha_lower_bound(2)


def test_combined_margin_rejects_nonsense_with_clear_errors():
    with pytest.raises(ValueError, match="m1"):
        L.CombinedMarginHead(m1=0)
    with pytest.raises(ValueError, match="margin"):
        L.CombinedMarginHead(m2=-0.1)
    with pytest.raises(ValueError, match="unknown classification loss"):
        L.build_head("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        L.build_head("arcface", margin=0.5)


# --------------------------------------------------------------------- properties


MARGIN_HEADS = [
    ("sphereface", lambda: L.SphereFaceHead(4, schedule=L.LambdaSchedule(base=0.0), s=30.0)),
    ("lsoftmax", lambda: L.LSoftmaxHead(3, schedule=L.LambdaSchedule(base=0.0))),
    ("cosface", lambda: L.CosFaceHead(30.0, 0.35)),
    ("arcface", lambda: L.ArcFaceHead(30.0, 0.5)),
    ("combined", lambda: L.CombinedMarginHead(30.0, 1.2, 0.3, 0.2)),
    ("combined-m1", lambda: L.CombinedMarginHead(30.0, 2.0, 0.0, 0.1)),
]


@pytest.mark.parametrize("name,make", MARGIN_HEADS, ids=[n for n, _ in MARGIN_HEADS])
def test_margin_target_logit_never_exceeds_the_plain_cosine_logit(name, make):
    head = make()
    cos = torch.linspace(-1, 1, 4001).unsqueeze(1).repeat(1, 2)
    labels = torch.zeros(cos.shape[0], dtype=torch.long)
    xn = torch.full((cos.shape[0], 1), 5.0)
    wn = torch.full((1, 2), 2.0)
    head.eval()
    margin = head(cos, labels, xn, wn)
    plain = cos * head.scale(xn, wn)
    assert torch.all(margin[:, 0] <= plain[:, 0] + 1e-5)
    assert torch.equal(margin[:, 1], plain[:, 1])  # non-target columns untouched
    assert torch.any(margin[:, 0] < plain[:, 0] - 1e-3)  # a real margin somewhere


# --------------------------------------------------------------------- numerical safety


ALL_HEADS = [
    ("softmax", lambda: L.SoftmaxHead()),
    ("l2softmax", lambda: L.L2SoftmaxHead(16.0)),
    ("lsoftmax", lambda: L.LSoftmaxHead(4)),
    ("normface", lambda: L.NormFaceHead(30.0)),
    ("sphereface", lambda: L.SphereFaceHead(4)),
    ("cosface", lambda: L.CosFaceHead(64.0, 0.35)),
    ("arcface", lambda: L.ArcFaceHead(64.0, 0.5)),
    ("combined", lambda: L.CombinedMarginHead(64.0, 1.35, 0.25, 0.1)),
]


@pytest.mark.parametrize(
    "dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("name,make", ALL_HEADS, ids=[n for n, _ in ALL_HEADS])
def test_gradients_are_finite_at_theta_zero_and_pi(name, make, dtype):
    torch.manual_seed(0)
    d, c = 16, 6
    clf = MarginClassifier(make(), d, c)
    clf.train()
    proj = torch.nn.Linear(d, d)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(d))
        proj.bias.zero_()
    w = clf.weight.detach()
    # rows exactly on (θ = 0), exactly opposite (θ = π), and within fp16 rounding of both
    inputs = torch.stack([w[0], -w[1], w[2] * (1 + 1e-4), -w[3] + 1e-5, w[4] * 40, -w[5] * 40])
    labels = torch.arange(6)
    inputs.requires_grad_(True)
    ctx = (
        torch.autocast("cpu", dtype=dtype)
        if dtype is not None
        else torch.autocast("cpu", enabled=False)
    )
    with ctx:
        emb = proj(inputs)
        loss = clf(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    for tensor in (inputs.grad, clf.weight.grad, proj.weight.grad):
        assert tensor is not None and torch.isfinite(tensor).all(), name
    # and on cosines of exactly ±1 handed to the head (where acos' and sqrt(1-cos²)' are infinite)
    cos = torch.tensor(
        [[1.0, -1.0], [-1.0, 1.0], [1 - 1e-7, 0.0], [-1 + 1e-7, 0.0]], requires_grad=True
    )
    with ctx:
        logits = make()(
            cos.to(dtype or torch.float32),
            torch.tensor([0, 0, 0, 0]),
            torch.full((4, 1), 3.0),
            torch.ones(1, 2),
        )
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0, 0])).backward()
    assert torch.isfinite(cos.grad).all(), name


# --------------------------------------------------------------------- metric losses


def test_center_loss_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    loss_fn = L.CenterLoss(num_classes=4, embedding_dim=3, alpha=0.5)
    centres = torch.randn(4, 3, generator=g)
    loss_fn.centers.copy_(centres)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    # Wen et al. 2016, eq. 2, averaged over the batch: L_C = ½·mean_i ‖x_i − c_{y_i}‖²
    xr = x.clone().requires_grad_(True)
    ref = 0.5 * ((xr - centres.double()[y]) ** 2).sum(1).mean()
    ref.backward()
    xt = x.clone().requires_grad_(True)
    loss_fn.eval()
    loss = loss_fn(xt, y)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-5, atol=1e-7)
    # the centres are no parameters: the optimiser never sees them
    assert not list(loss_fn.parameters())


def test_center_loss_value_and_paper_update_rule():
    torch.manual_seed(1)
    loss_fn = L.CenterLoss(num_classes=4, embedding_dim=3, alpha=0.5)
    loss_fn.centers.copy_(torch.randn(4, 3))
    x = torch.randn(6, 3)
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    before = loss_fn.centers.clone()
    loss_fn.train()
    loss = loss_fn(x, y)
    assert loss.item() == pytest.approx(0.5 * ((x - before[y]) ** 2).sum(1).mean().item(), rel=1e-6)
    for j in range(4):
        members = x[y == j]
        delta = (before[j] - members).sum(0) / (1 + len(members))
        torch.testing.assert_close(loss_fn.centers[j], before[j] - 0.5 * delta)
    loss_fn.eval()
    loss_fn(x, y)
    torch.testing.assert_close(loss_fn.centers[0], before[0] - 0.5 * (before[0] - x[:2]).sum(0) / 3)


def _unit(*degrees: float) -> torch.Tensor:
    """Unit vectors in the plane at these angles (squared distance 2 − 2·cos of the difference)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(rad), torch.sin(rad)], dim=1)


def _sq(a: float, b: float) -> float:
    return 2 - 2 * math.cos(math.radians(a - b))


def test_semi_hard_mining_on_the_issue_example_is_zero():
    # angles 0° and 60° (identity 0), 50° and 130° (identities 1, 2); squared distances on the
    # unit circle, FaceNet's α = 0.2.  Anchor 0°, positive 60°: d_ap = 1; negatives 0.714 (nearer
    # than the positive) and 3.286 (beyond d_ap + α): no semi-hard negative, and the triplet with
    # the far one already meets the margin.  Anchor 60°, positive 0°: d_ap = 1; negatives 0.030
    # and 1.316 (> 1.2): the same.  Both triplets satisfy the constraint: loss 0.  (The old rule,
    # falling back to the hardest negative, gave (0.486 + 1.170) / 2 = 0.83.)  With TF Addons'
    # default margin 1.0 the loss would be (1 − 1.316 + 1) / 2 = 0.342; with unsquared distances
    # and α = 0.2, (1 − 1.147 + 0.2) / 2 = 0.026: squared distances and α = 0.2 are what make it 0.
    assert _sq(0, 60) == pytest.approx(1.0)
    assert _sq(60, 130) > _sq(0, 60) + 0.2 and _sq(0, 50) < _sq(0, 60)
    x, y = _unit(0, 60, 50, 130), torch.tensor([0, 0, 1, 2])
    assert L.TripletLoss(margin=0.2, mining="semi_hard")(x, y).item() == pytest.approx(0, abs=1e-7)


def test_semi_hard_mining_without_a_farther_negative_takes_the_farthest():
    # anchor 0°, positive 90° (d_ap = 2); negatives at 30° (0.268) and 60° (1.0), both nearer than
    # the positive.  TF Addons' triplet_semihard_loss then uses the largest negative distance:
    # 2 − 1 + 0.2 = 1.2 for anchor 0°, and the same for anchor 90° (negatives 1.0 and 0.268).
    # (The hardest negative would give 2 − 0.268 + 0.2 = 1.932.)
    x, y = _unit(0, 90, 30, 60), torch.tensor([0, 0, 1, 2])
    got = L.TripletLoss(margin=0.2, mining="semi_hard")(x, y).item()
    assert got == pytest.approx(2 - _sq(0, 60) + 0.2, rel=1e-6)
    # a semi-hard negative inside the band: anchor 0°, positive 60° (d_ap = 1), negatives at 63°
    # (1.092, inside (1, 1.2)) and 64° (1.123): the nearer semi-hard one, 1 − 1.092 + 0.2 = 0.108;
    # anchor 60°: negatives at 3° and 4° from it, nearer than the positive, so the farther (4°):
    # 1 − (2 − 2 cos 4°) + 0.2
    x, y = _unit(0, 60, 63, 64), torch.tensor([0, 0, 1, 2])
    want = ((1 - _sq(0, 63) + 0.2) + (1 - _sq(60, 64) + 0.2)) / 2
    got = L.TripletLoss(margin=0.2, mining="semi_hard")(x, y).item()
    assert got == pytest.approx(want, rel=1e-6)


def _value(t: torch.Tensor) -> float:
    return float(t.detach())


def _brute_triplet(x, y, margin, mining):
    """Each anchor-positive pair's triplet term by the papers' definitions, in float64 (autograd
    through the chosen distances; the choice itself by plain comparisons in loops).

    batch_hard (Hermans et al. 2017): the anchor's farthest positive and nearest negative.
    semi_hard (Schroff et al. 2015): a semi-hard negative n has d(a,p) < d(a,n) < d(a,p) + α;
    the hardest of them (the nearest) is used.  With none, either some negative lies beyond the
    band (the triplet already meets the margin: term 0) or every negative is at most as far as
    the positive, and TF Addons' ``triplet_semihard_loss`` uses the farthest negative.
    """
    x = x / torch.sqrt((x * x).sum(1, keepdim=True))
    n = len(y)
    d = [[((x[i] - x[j]) ** 2).sum() for j in range(n)] for i in range(n)]
    out = []
    for a in range(n):
        pos = [d[a][p] for p in range(n) if p != a and y[p] == y[a]]
        neg = [d[a][q] for q in range(n) if y[q] != y[a]]
        if mining == "batch_hard":
            if pos:
                hardest_pos = max(pos, key=_value)
                out.append(torch.relu(hardest_pos - min(neg, key=_value) + margin))
            continue
        for d_ap in pos:
            semi = [v for v in neg if _value(d_ap) < _value(v) < _value(d_ap) + margin]
            if semi:
                out.append(d_ap - min(semi, key=_value) + margin)
            elif any(_value(v) > _value(d_ap) for v in neg):
                out.append(torch.zeros((), dtype=x.dtype))
            else:
                out.append(d_ap - max(neg, key=_value) + margin)
    return torch.stack(out).mean()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
def test_triplet_loss_matches_brute_force_mining(mining, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5])
    for margin in (0.2, 0.5, 1.0):
        xr, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ref = _brute_triplet(xr, y, margin, mining)
        got = L.TripletLoss(margin=margin, mining=mining)(xt, y)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        if ref.item() > 0:
            ref.backward()
            got.backward()
            torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        L.TripletLoss(mining="easy")
    with pytest.raises(ValueError, match="positive pair"):
        L.TripletLoss()(x[:3], torch.tensor([0, 1, 2]))


def test_marginal_loss_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    theta, xi = 1.2, 0.3
    # Deng et al. 2017, eq. 1: 1/(m² − m) Σ_{i≠j} [ξ − y_ij (θ − ‖x̂_i − x̂_j‖²)]₊
    xr = x.clone().requires_grad_(True)
    xn = xr / torch.sqrt((xr * xr).sum(1, keepdim=True))
    terms = []
    for i in range(7):
        for j in range(7):
            if i != j:
                yij = 1.0 if y[i] == y[j] else -1.0
                terms.append(torch.relu(xi - yij * (theta - ((xn[i] - xn[j]) ** 2).sum())))
    ref = torch.stack(terms).sum() / (49 - 7)
    ref.backward()
    xt = x.clone().requires_grad_(True)
    got = L.MarginalLoss(theta, xi)(xt, y)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ref.item() > 0 and xr.grad.abs().max() > 0
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------- partial FC


def test_full_softmax_equals_plain_cross_entropy_of_the_head_logits():
    torch.manual_seed(4)
    head = L.ArcFaceHead(32.0, 0.5)
    clf = MarginClassifier(head, 8, 20, sample_rate=1.0)
    x = torch.randn(10, 8)
    y = torch.randint(0, 20, (10,))
    clf.eval()
    w = clf.weight
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    ref = torch.nn.functional.cross_entropy(
        head(cos, y, x.norm(dim=1, keepdim=True), w.norm(dim=1).unsqueeze(0)), y
    )
    torch.testing.assert_close(clf(x, y), ref)


def test_partial_fc_samples_every_positive_and_the_requested_rate():
    torch.manual_seed(5)
    clf = MarginClassifier(L.CosFaceHead(), 8, 1000, sample_rate=0.1)
    y = torch.randint(0, 1000, (64,))
    torch.manual_seed(6)
    index, mapped = clf._sample(y)
    assert index.numel() == 100
    assert set(y.tolist()) <= set(index.tolist())
    assert torch.equal(index[mapped], y)
    x = torch.randn(64, 8)
    torch.manual_seed(6)  # the forward pass draws the same sample
    loss = clf(x, y)
    loss.backward()
    touched = (clf.weight.grad.abs().sum(1) > 0).nonzero().squeeze(1)
    assert touched.numel() > 0 and set(touched.tolist()) <= set(index.tolist())


def test_shards_cover_every_class_exactly_once():
    for classes, world in [(10, 3), (7, 7), (1000, 8), (5, 2)]:
        ranges = [shard_range(classes, r, world) for r in range(world)]
        covered = [c for s, e in ranges for c in range(s, e)]
        assert covered == list(range(classes))
