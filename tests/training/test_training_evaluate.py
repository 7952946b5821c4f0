"""Verification reports: pair protocol, TAR@FAR, calibration, .bin round trip, backbones' shapes."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require_reference

torch = require_reference("torch", "the training package's framework (train extra)")

from training import evaluate as ev


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: CPU training on a shared 2-core box is fastest without OpenMP
    contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _synthetic_pairs(n_id=40, per=3, dim=16, noise=0.6, seed=0):
    """Images are encoded embeddings: identity centre + noise; every crop is a distinct array."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_id, dim))
    emb = np.repeat(centres, per, axis=0) + noise * rng.standard_normal((n_id * per, dim))
    ids = np.repeat(np.arange(n_id), per)
    first, second, same = [], [], []
    for i in range(0, n_id * per, per):
        first.append(i), second.append(i + 1), same.append(True)
        first.append(i), second.append((i + per) % (n_id * per)), same.append(False)
    n = len(same)
    pair_set = ev.PairSet(
        images=np.zeros((n_id * per, 4, 4, 3), np.uint8),
        first=np.array(first),
        second=np.array(second),
        same=np.array(same),
        folds=np.arange(n) * 10 // n,
        identities=[str(i) for i in ids],
    )
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), pair_set


def test_report_accuracy_tar_and_calibration():
    emb, pairs = _synthetic_pairs()
    report = ev.verification_report(emb, pairs)
    scores = np.sum(emb[pairs.first] * emb[pairs.second], axis=1)
    assert report["folds"] == 10 and len(report["fold_accuracies"]) == 10
    assert report["accuracy"] == pytest.approx(np.mean(report["fold_accuracies"]), abs=1e-6)
    assert report["std"] == pytest.approx(np.std(report["fold_accuracies"]), abs=1e-6)
    # TAR@FAR = 1e-1 is the largest TAR of any threshold with FAR <= 0.1: by counting, over every
    # observed score as a threshold (scores in float64, as the service compares them)
    point = report["tar_at_far"]["1e-01"]
    t = point["threshold"]
    neg, pos = scores[~pairs.same].astype(np.float64), scores[pairs.same].astype(np.float64)
    assert point["far"] == pytest.approx(np.mean(neg >= t), abs=1e-6)
    assert point["tar"] == pytest.approx(np.mean(pos >= t), abs=1e-6)
    candidates = [(np.mean(pos >= c), np.mean(neg >= c)) for c in np.append(scores, np.inf)]
    best = max(tar for tar, far in candidates if far <= 0.1)
    assert point["far"] <= 0.1 and point["tar"] == pytest.approx(best, abs=1e-6)
    # the calibrated thresholds hold their false-match rate over all impostor image pairs
    th = ev.card_thresholds(report)
    assert set(th) == {"fmr_1e-2", "fmr_1e-3", "fmr_1e-4"}
    assert th["fmr_1e-2"] <= th["fmr_1e-3"] <= th["fmr_1e-4"]
    ids = np.array(pairs.identities)
    sims = emb @ emb.T
    upper = np.triu(np.ones_like(sims, bool), 1) & (ids[:, None] != ids[None, :])
    # (1e-6: float32 products summed in another order differ in the last bit)
    at_1e2 = th["fmr_1e-2"]
    assert np.mean(sims[upper] >= at_1e2 + 1e-6) <= 1e-2 < np.mean(sims[upper] >= at_1e2 - 0.02)


def test_separable_embeddings_score_perfectly_and_random_ones_do_not():
    emb, pairs = _synthetic_pairs(noise=0.05)
    assert ev.verification_report(emb, pairs, calibrate=False)["accuracy"] == 1.0
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(emb.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    assert ev.verification_report(noise, pairs, calibrate=False)["accuracy"] < 0.8


def test_flip_embeddings_sum_the_mirror_image():
    images = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)

    def embed(crops):  # an embedding that sees left/right asymmetry
        n = len(crops)
        return crops.reshape(n, 8, -1)[:, :, :12].reshape(n, -1).astype(np.float32)

    got = ev.flip_embeddings(embed, images)
    want = embed(images) + embed(images[:, :, ::-1])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_insightface_bin_round_trip_and_restricted_unpickling(tmp_path):
    import pickle

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)
    images[:] = np.clip(images.astype(int) // 8 * 8, 0, 255).astype(np.uint8)
    pairs = ev.PairSet(
        images=images,
        first=np.array([0, 2, 4, 6]),
        second=np.array([1, 3, 5, 7]),
        same=np.array([True, False, True, False]),
        folds=np.zeros(4, int),
    )
    ev.write_bin(tmp_path / "x.bin", pairs)
    loaded = ev.load_bin(tmp_path / "x.bin")
    assert loaded.images.shape == (8, 112, 112, 3)
    assert list(loaded.same) == [True, False, True, False]
    assert list(loaded.first) == [0, 2, 4, 6]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([Evil()], [True])))
    with pytest.raises(pickle.UnpicklingError):
        ev.load_bin(tmp_path / "evil.bin")


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("iresnet18", {"input_size": 32}),
        ("iresnet34", {"input_size": 32}),
        ("iresnet50", {"input_size": 32}),
        ("iresnet100", {"input_size": 32}),
        ("mobilefacenet", {}),
        ("resnet50", {"width": 16}),
        ("mobilenetv1", {"width": 0.25}),
    ],
)
def test_backbones_map_faces_to_the_configured_dimension(name, kwargs):
    from training.backbones import build_backbone

    model = build_backbone(name, embedding_dim=64, **kwargs).eval()
    side = kwargs.get("input_size", 112)
    with torch.inference_mode():
        out = model(torch.randn(2, 3, side, side))
    assert out.shape == (2, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        build_backbone("vgg", 64)
