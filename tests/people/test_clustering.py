"""The clustering algorithm on its own: parameters from a real card, and its constraints
on synthetic people (tight groups of unit vectors around random centres)."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from service.config import MANIFEST_PATH
from service.gallery.clustering import cluster, impostor_tail, params_from_card
from service.registry import Registry
from tests.conftest import SHARED_MODELS


def card_thresholds() -> dict[str, float]:
    card, _ = Registry(MANIFEST_PATH, [SHARED_MODELS]).resolve("mobilefacenet_peer_128d")
    return dict(card.thresholds)


def test_parameters_follow_the_card():
    thresholds = card_thresholds()
    mean, std = impostor_tail(thresholds)
    for point, value in thresholds.items():  # the Gaussian tail passes through every point
        z = NormalDist().inv_cdf(1 - float(point[4:]))
        assert abs(mean + std * z - value) < 0.01
    small = params_from_card(thresholds, "fmr_1e-2", "fmr_1e-3", 16, 10)
    large = params_from_card(thresholds, "fmr_1e-2", "fmr_1e-3", 16, 100_000)
    assert small.average == large.average == thresholds["fmr_1e-3"]
    assert thresholds["fmr_1e-2"] <= small.link < large.link <= 1.0


def people(rng, n_people: int, per: int, dim: int = 32, spread: float = 0.25):
    centres = rng.standard_normal((n_people, dim))
    vectors = np.repeat(centres, per, axis=0) + spread * rng.standard_normal((n_people * per, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), np.repeat(np.arange(n_people), per)


def test_constraints():
    rng = np.random.default_rng(0)
    vectors, truth = people(rng, 5, 6)
    params = params_from_card(card_thresholds(), "fmr_1e-2", "fmr_1e-3", 8, len(vectors))
    photos = np.arange(len(vectors))
    labels = cluster(vectors, photos, params)
    assert (labels >= 0).all()
    for label in set(labels):  # each group one person, each person one group
        assert len(set(truth[labels == label])) == 1
    assert len(set(labels)) == 5
    # faces 0 and 1 (one person) in one photo: never together
    photos = photos.copy()
    photos[1] = photos[0]
    labels = cluster(vectors, photos, params)
    assert labels[0] != labels[1] or labels[0] < 0
    # two existing clusters of one person never merge; a banned face never joins
    fixed = np.full(len(vectors), -1)
    fixed[[0, 1]] = 7
    fixed[[2, 3]] = 8
    forbidden = [set() for _ in vectors]
    forbidden[4] = {7, 8}
    labels = cluster(vectors, np.arange(len(vectors)), params, fixed, forbidden)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert labels[4] not in (labels[0], labels[2])
