"""The calibration protocol (service.pipeline.calibration) and the registry's deployment
calibration: exact thresholds from the streamed tail, rule of 30, bootstrap over persons."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from service.pipeline import calibration as cal
from tests.conftest import SHARED_MODELS


def _unit(rng, n: int, dim: int = 16) -> np.ndarray:
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_streamed_tail_gives_the_thresholds_of_a_full_sort():
    """Many small blocks (each pruning the kept tail): every threshold equals the one read off
    all impostor scores sorted (the definition), and the pair counts are the combinatorial
    ones."""
    rng = np.random.default_rng(3)
    n = 1200
    persons = rng.integers(0, 90, n).astype(str)
    emb = _unit(rng, n)
    scores = cal.tally(emb, persons, block_entries=20_000)
    full = (emb.astype(np.float64) @ emb.T.astype(np.float64))[np.triu_indices(n, 1)]
    a, b = np.triu_indices(n, 1)
    impostors = np.sort(full[persons[a] != persons[b]])[::-1]
    genuine = full[persons[a] == persons[b]]
    assert scores.impostors == impostors.size
    assert scores.genuine.size == genuine.size
    assert int(scores.histogram.sum()) == impostors.size
    for fmr in (1e-2, 1e-3, 1e-4):
        allowed = math.floor(round(fmr * impostors.size, 9))
        expected = impostors[allowed]  # the highest score that must be refused
        got = cal.threshold_at(scores.tail, scores.impostors, fmr)
        assert got == pytest.approx(expected, abs=1e-6)
        assert np.count_nonzero(impostors >= got + 1e-6) <= allowed


def test_rule_of_30_reports_only_supported_points_and_the_photos_needed():
    # 3,000 impostor pairs support FMR 1e-2 (30 expected false matches), 2,999 do not
    def scores(impostors: int) -> cal.Scores:
        tail = np.linspace(0.9, 0.1, impostors)
        return cal.Scores(
            photo_person=np.repeat(np.arange(10), 3),
            persons=10,
            genuine=np.array([0.95, 0.5]),
            genuine_pairs=np.array([[0, 1], [3, 4]]),
            impostors=impostors,
            tail=tail,
            tail_pairs=np.zeros((impostors, 2), np.int64),
            histogram=np.zeros(cal.HISTOGRAM_BINS, np.int64),
        )

    enough = cal.operating_points(scores(3000), replicates=0)
    assert [p.name for p in enough.points] == ["fmr_1e-2"]
    short = cal.operating_points(scores(2999), replicates=0)
    assert short.points == ()
    need = {u.name: u for u in short.unsupported}
    assert set(need) == set(cal.CALIBRATION_POINTS)
    # the photos named, in persons of 3 photos (as these), give 30/FMR impostor pairs
    for name, fmr in cal.CALIBRATION_POINTS.items():
        photos, persons = need[name].photos_needed, need[name].persons_needed
        assert need[name].impostors_needed == round(30 / fmr)
        pairs = (photos * photos - photos * 3) // 2
        assert pairs >= 30 / fmr > ((photos - 3) ** 2 - (photos - 3) * 3) / 2
        assert persons == math.ceil(photos / 3)


def test_bootstrap_resamples_persons_not_pairs():
    """10 persons with 100 genuine pairs each; all of person 0's fail, every other passes.
    Resampling persons, a replicate's FNMR is k/10 with k ~ Binomial(10, 0.1) (the times
    person 0 is drawn), whose 2.5 and 97.5 percentiles are 0 and 3: the interval is
    [0, 0.3]. Resampling the 1,000 pairs would give about 0.1 ± 0.02."""
    persons = 10
    photo_person = np.repeat(np.arange(persons), 20)  # 20 photos each
    genuine_pairs = np.stack([np.repeat(np.arange(persons) * 20, 100)] * 2, axis=1)
    genuine = np.where(np.repeat(np.arange(persons), 100) == 0, -0.9, 0.9)
    impostors = cal.impostor_pair_count(np.full(persons, 20))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 200, impostors * 2)
    b = (a + 20 * rng.integers(1, persons, impostors * 2)) % 200  # another person's photo
    tail = np.sort(rng.uniform(-0.5, 0.0, impostors))[::-1]
    scores = cal.Scores(
        photo_person,
        persons,
        genuine,
        genuine_pairs,
        impostors,
        tail,
        np.stack([a[:impostors], b[:impostors]], axis=1),
        np.zeros(cal.HISTOGRAM_BINS, np.int64),
    )
    points = cal.operating_points(scores, {"fmr_1e-2": 1e-2}, replicates=1000, seed=7)
    [point] = points.points
    assert point.fnmr == pytest.approx(0.1)
    assert point.fnmr_ci is not None and point.threshold_ci is not None
    assert (point.fnmr_ci.low, point.fnmr_ci.high) == pytest.approx((0.0, 0.3))
    assert point.threshold_ci.low <= point.threshold <= point.threshold_ci.high
    again = cal.operating_points(scores, {"fmr_1e-2": 1e-2}, replicates=1000, seed=7)
    assert again == points  # the seed fixes the draws
    other = cal.operating_points(scores, {"fmr_1e-2": 1e-2}, replicates=1000, seed=8)
    assert other.points[0].threshold_ci != point.threshold_ci


def test_det_curve_falls_as_the_fmr_rises():
    rng = np.random.default_rng(5)
    persons = np.repeat(np.arange(60), 6).astype(str)
    emb = _unit(rng, 360, dim=8)
    emb[1::2] = emb[::2] + 0.3 * _unit(rng, 180, dim=8)  # photo pairs of one person close
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    fmr, fnmr = cal.det_curve(cal.tally(emb, persons))
    assert fmr.size > 100
    assert np.all(np.diff(fmr) >= 0) and np.all(np.diff(fnmr) <= 0)
    assert fmr[0] == pytest.approx(1 / cal.impostor_pair_count(np.full(60, 6)))


# --- the registry's deployment calibration ----------------------------------------------------


def _calibration(name: str, sha256: str, thresholds: dict) -> dict:
    return {
        "model": name,
        "model_sha256": sha256,
        "created_at": "2026-12-08T01:00:00+00:00",
        "source": {"kind": "photos", "persons": 40, "photos": 400, "impostor_pairs": 79000},
        "detector": "yunet_2023mar@x",
        "thresholds": thresholds,
        "default_operating_point": "fmr_1e-3",
    }


def test_a_deployment_calibration_replaces_the_card_thresholds_and_another_files_is_refused(
    tmp_path,
):
    from service.config import MANIFEST_PATH
    from service.registry import ModelError, Registry

    name = "mobilefacenet_peer_128d"
    shutil.copy(SHARED_MODELS / f"{name}.onnx", tmp_path / f"{name}.onnx")
    shipped = Registry(MANIFEST_PATH, [tmp_path])
    card, _ = shipped.resolve(name, task="recognition")
    assert card.calibration is None
    manifest_thresholds = dict(card.thresholds)
    points = {"fmr_1e-2": 0.31, "fmr_1e-3": 0.42}
    (tmp_path / f"{name}.calibration.json").write_text(
        json.dumps(_calibration(name, str(card.sha256), points))
    )
    calibrated, _ = Registry(MANIFEST_PATH, [tmp_path]).resolve(name, task="recognition")
    assert calibrated.thresholds == points and calibrated.default_operating_point == "fmr_1e-3"
    assert calibrated.calibration is not None
    assert calibrated.calibration.summary()["source"] == "deployment"
    assert "calibration" not in calibrated.model_dump()  # never written into a card
    # the manifest's card is as shipped, and the maker of a calibration can ignore it
    assert Registry(MANIFEST_PATH, [tmp_path]).cards[name].thresholds == manifest_thresholds
    unapplied, _ = Registry(MANIFEST_PATH, [tmp_path], calibrations=False).resolve(name)
    assert unapplied.thresholds == manifest_thresholds
    (tmp_path / f"{name}.calibration.json").write_text(
        json.dumps(_calibration(name, "0" * 64, points))
    )
    with pytest.raises(ModelError, match="made for model file sha256 0{64}"):
        Registry(MANIFEST_PATH, [tmp_path]).resolve(name, task="recognition")


def test_flip_follows_the_card_unless_configured_and_tags_the_model_id(default_models_dir):
    """dlib_resnet_v1's thresholds are calibrated on flip-augmented embeddings (its card's
    extra.flip_augment): served so by default, under a model id of its own; the peer's are
    not. FACEGATE_FLIP_AUGMENT overrides either way."""
    from service.config import MANIFEST_PATH, Settings
    from service.pipeline.embed import OnnxEmbedder
    from service.registry import Registry

    registry = Registry(MANIFEST_PATH, [default_models_dir, SHARED_MODELS])
    dlib = registry.resolve("dlib_resnet_v1", task="recognition")
    peer = registry.resolve("mobilefacenet_peer_128d", task="recognition")
    manifest = json.loads(MANIFEST_PATH.read_text())["models"]
    [entry] = [m for m in manifest if m["name"] == "dlib_resnet_v1"]
    assert entry["extra"]["flip_augment"] is True
    assert "with flip" in entry["evaluation"]["lfw_grayscale"]["protocol"]
    default = OnnxEmbedder(*dlib, Settings())
    assert default.flip and default.model_id == f"{dlib[0].id}+flip"
    plain = OnnxEmbedder(*dlib, Settings(flip_augment=False))
    assert not plain.flip and plain.model_id == dlib[0].id
    assert registry.sha256_of(default.model_id) == registry.sha256_of(plain.model_id)
    assert registry.sha256_of(default.model_id) == dlib[0].sha256
    assert not OnnxEmbedder(*peer, Settings()).flip
    assert OnnxEmbedder(*peer, Settings(flip_augment=True)).model_id.endswith("+flip")
