"""The margin and metric losses against their papers' formulas, computed independently in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import require_reference

torch = require_reference("torch", "the training package's framework (train extra)")

from training import losses as L
from training.partial_fc import MarginClassifier, shard_range

RNG = np.random.default_rng(0)


def _random_case(b=16, c=10, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64) * 3
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (b,), generator=g)
    xn = x.norm(dim=1, keepdim=True)
    wn = w.norm(dim=1).unsqueeze(0)
    cos = (x / xn) @ (w / wn.T).T
    return x, w, labels, cos, xn, wn


def _paper_psi(theta: np.ndarray, m: int) -> np.ndarray:
    """ψ(θ) = (-1)^k cos(mθ) − 2k, θ ∈ [kπ/m, (k+1)π/m] (L-Softmax eq. 6 / SphereFace eq. 6)."""
    k = np.minimum(np.floor(theta * m / math.pi), m - 1)
    return (-1.0) ** k * np.cos(m * theta) - 2 * k


def _logits(head, cos, labels, xn, wn):
    head.eval()
    return head(cos, labels, xn, wn).double().numpy()


def _expect(base: np.ndarray, labels, target: np.ndarray) -> np.ndarray:
    out = base.copy()
    out[np.arange(len(labels)), labels.numpy()] = target
    return out


# --------------------------------------------------------------------- formulas


def test_softmax_logits_are_the_inner_product():
    x, w, labels, cos, xn, wn = _random_case()
    got = _logits(L.SoftmaxHead(), cos, labels, xn, wn)
    np.testing.assert_allclose(got, (x @ w.T).numpy(), rtol=1e-5, atol=1e-5)


def test_l2_softmax_fixes_the_feature_norm_to_alpha():
    x, w, labels, cos, xn, wn = _random_case()
    alpha = 12.0
    got = _logits(L.L2SoftmaxHead(alpha=alpha), cos, labels, xn, wn)
    ref = (alpha * x / xn) @ w.T
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_lsoftmax_target_is_norms_times_piecewise_psi(m):
    x, w, labels, cos, xn, wn = _random_case(seed=m)
    head = L.LSoftmaxHead(m=m, schedule=L.LambdaSchedule(base=0.0))
    got = _logits(head, cos, labels, xn, wn)
    rows = np.arange(len(labels))
    theta = np.arccos(np.clip(cos.numpy()[rows, labels.numpy()], -1, 1))
    target = (xn[:, 0].numpy() * wn[0, labels].numpy()) * _paper_psi(theta, m)
    np.testing.assert_allclose(got, _expect((x @ w.T).numpy(), labels, target), rtol=1e-5, atol=1e-4)


def test_sphereface_lambda_annealing_blends_plain_and_margin_logits():
    _x, _w, labels, cos, xn, wn = _random_case(seed=7)
    schedule = L.LambdaSchedule(base=1000, gamma=0.12, power=1, lambda_min=5)
    head = L.SphereFaceHead(m=4, schedule=schedule)
    head.train()
    for _ in range(3):
        head(cos, labels, xn, wn)
    lam = schedule(3)
    assert lam == pytest.approx(1000 / (1 + 0.12 * 3))
    assert head.current_lambda == pytest.approx(lam)
    got = _logits(head, cos, labels, xn, wn)
    rows = np.arange(len(labels))
    c = cos.numpy()[rows, labels.numpy()]
    target = xn[:, 0].numpy() * (lam * c + _paper_psi(np.arccos(c), 4)) / (1 + lam)
    np.testing.assert_allclose(got, _expect((xn * cos).numpy(), labels, target), rtol=1e-5, atol=1e-4)
    assert schedule(10 ** 6) == 5  # floor λ_min
    with pytest.raises(ValueError):
        L.SphereFaceHead(m=1.5)


def test_normface_cosface_arcface_formulas():
    _x, _w, labels, cos, xn, wn = _random_case(seed=3)
    rows, lab = np.arange(len(labels)), labels.numpy()
    c = cos.numpy()
    s = 30.0
    np.testing.assert_allclose(_logits(L.NormFaceHead(s=s), cos, labels, xn, wn), s * c, rtol=1e-5)
    got = _logits(L.CosFaceHead(s=s, m=0.35), cos, labels, xn, wn)
    np.testing.assert_allclose(got, _expect(s * c, labels, s * (c[rows, lab] - 0.35)), rtol=1e-5, atol=1e-4)
    got = _logits(L.ArcFaceHead(s=s, m=0.5), cos, labels, xn, wn)
    theta = np.arccos(c[rows, lab])
    ref = np.where(theta + 0.5 <= math.pi, np.cos(theta + 0.5), -np.cos(theta + 0.5) - 2)
    np.testing.assert_allclose(got, _expect(s * c, labels, s * ref), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m1,m2,m3", [(1, 0.5, 0), (1, 0, 0.35), (1, 0.3, 0.2), (1.35, 0.25, 0.1),
                                      (2, 0, 0), (4, 0, 0), (0.9, 0.4, 0.15)])
def test_combined_margin_matches_its_formula_and_is_monotone_continuous(m1, m2, m3):
    cos = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    psi = L.margin_psi(cos, m1, m2, m3).numpy()
    theta = np.arccos(cos.numpy())
    phi = m1 * theta + m2
    on_range = phi <= math.pi
    np.testing.assert_allclose(psi[on_range], np.cos(phi[on_range]) - m3, atol=2e-3)
    # ψ is non-increasing in θ, i.e. non-decreasing in cos; continuous (no jumps on a fine grid)
    assert np.all(np.diff(psi) >= -1e-9)
    assert np.max(np.abs(np.diff(psi))) < 0.05


def test_combined_margin_rejects_nonsense_with_clear_errors():
    with pytest.raises(ValueError, match="m1"):
        L.CombinedMarginHead(m1=0)
    with pytest.raises(ValueError, match="margin"):
        L.CombinedMarginHead(m2=-0.1)
    with pytest.raises(ValueError, match="unknown classification loss"):
        L.build_head("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        L.build_head("arcface", margin=0.5)


# --------------------------------------------------------------------- reductions


def _all_logits(head, cos, labels):
    xn = torch.ones(cos.shape[0], 1, dtype=cos.dtype)
    wn = torch.ones(1, cos.shape[1], dtype=cos.dtype)
    head.eval()
    return head(cos, labels, xn, wn)


def test_combined_margin_reduces_exactly_to_each_named_loss():
    _, _, labels, cos, _, _ = _random_case(b=64, c=12, seed=11)
    cos = cos.float()
    s = 64.0
    pairs = [
        (L.CombinedMarginHead(s, 1, 0.5, 0), L.ArcFaceHead(s, 0.5)),
        (L.CombinedMarginHead(s, 1, 0, 0.35), L.CosFaceHead(s, 0.35)),
        (L.CombinedMarginHead(s, 1, 0, 0), L.NormFaceHead(s)),
        (L.CombinedMarginHead(s, 4, 0, 0),
         L.SphereFaceHead(4, schedule=L.LambdaSchedule(base=0.0), s=s)),
    ]
    for combined, named in pairs:
        torch.testing.assert_close(_all_logits(combined, cos, labels), _all_logits(named, cos, labels),
                                   rtol=0, atol=1e-4)
    # and the named losses differ from one another (the comparison above is not vacuous)
    assert not torch.allclose(_all_logits(pairs[0][1], cos, labels), _all_logits(pairs[1][1], cos, labels))


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


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
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
    ctx = (torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False))
    with ctx:
        emb = proj(inputs)
        loss = clf(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    for tensor in (inputs.grad, clf.weight.grad, proj.weight.grad):
        assert tensor is not None and torch.isfinite(tensor).all(), name
    # and on cosines of exactly ±1 handed to the head (where acos' and sqrt(1-cos²)' are infinite)
    cos = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1 - 1e-7, 0.0], [-1 + 1e-7, 0.0]], requires_grad=True)
    with ctx:
        logits = make()(cos.to(dtype or torch.float32), torch.tensor([0, 0, 0, 0]),
                        torch.full((4, 1), 3.0), torch.ones(1, 2))
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0, 0])).backward()
    assert torch.isfinite(cos.grad).all(), name


# --------------------------------------------------------------------- metric losses


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


def _brute_triplet(x, y, margin, mining):
    """Each anchor-positive pair's triplet term by the papers' definitions, in float64 loops.

    batch_hard (Hermans et al. 2017): the anchor's farthest positive and nearest negative.
    semi_hard (Schroff et al. 2015): a semi-hard negative n has d(a,p) < d(a,n) < d(a,p) + α;
    the hardest of them (the nearest) is used.  With none, either some negative lies beyond the
    band (the triplet already meets the margin: term 0) or every negative is at most as far as
    the positive, and TF Addons' ``triplet_semihard_loss`` uses the farthest negative.
    """
    x = torch.nn.functional.normalize(x.double(), dim=1)
    n = len(y)
    d = [[float(((x[i] - x[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    out = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and y[p] == y[a]]
        neg = [d[a][q] for q in range(n) if y[q] != y[a]]
        if mining == "batch_hard":
            if pos:
                out.append(max(0.0, max(d[a][p] for p in pos) - min(neg) + margin))
            continue
        for p in pos:
            d_ap = d[a][p]
            semi = [v for v in neg if d_ap < v < d_ap + margin]
            if semi:
                out.append(d_ap - min(semi) + margin)
            elif any(v > d_ap for v in neg):
                out.append(0.0)
            else:
                out.append(d_ap - max(neg) + margin)
    return float(np.mean(out))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
def test_triplet_loss_matches_brute_force_mining(mining, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 3, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5])
    for margin in (0.2, 0.5, 1.0):
        got = L.TripletLoss(margin=margin, mining=mining)(x, y).item()
        assert got == pytest.approx(_brute_triplet(x, y, margin, mining), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError):
        L.TripletLoss(mining="easy")
    with pytest.raises(ValueError, match="positive pair"):
        L.TripletLoss()(x[:3], torch.tensor([0, 1, 2]))


def test_marginal_loss_matches_the_paper_sum():
    torch.manual_seed(3)
    x = torch.randn(7, 4)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    theta, xi = 1.2, 0.3
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    total = 0.0
    for i in range(7):
        for j in range(7):
            if i != j:
                yij = 1.0 if y[i] == y[j] else -1.0
                total += max(0.0, xi - yij * (theta - float(((xn[i] - xn[j]) ** 2).sum())))
    got = L.MarginalLoss(theta, xi)(x, y).item()
    assert got == pytest.approx(total / (49 - 7), rel=1e-5)


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
        head(cos, y, x.norm(dim=1, keepdim=True), w.norm(dim=1).unsqueeze(0)), y)
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
