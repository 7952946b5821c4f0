"""The training loop on a tiny real set: every loss learns, checkpoints resume exactly, data
readers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import require_reference

torch = require_reference("torch", "the training package's framework (train extra)")

from tests.conftest import CELEBA, SHARED_MODELS
from training.config import load_config
from training.data import FaceImageFolder, PKSampler, RecordIODataset, write_recordio

#: a fixed, small slice of CelebA: 6 identities x up to 5 photos
IDENTITIES = 6
PER_IDENTITY = 5


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: CPU training on a shared 2-core box is fastest without OpenMP
    contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prepared_celeba(root: Path) -> Path:
    """Align the CelebA slice with the service's detector + aligner (once per test session)."""
    from training.prepare import prepare

    dst = root / "celeba112"
    if (dst / "dataset.json").is_file():
        return dst
    names = sorted(p.name for p in (CELEBA / "images").iterdir() if p.is_dir())[:IDENTITIES]
    report = prepare(
        CELEBA / "images",
        dst,
        detector="yunet_2023mar",
        model_dirs=[SHARED_MODELS],
        limit_per_identity=PER_IDENTITY,
        identities=names,
        progress=False,
    )
    assert report.aligned >= IDENTITIES * 3, report
    return dst


@pytest.fixture(scope="session")
def celeba_tiny(tmp_path_factory) -> Path:
    return prepared_celeba(tmp_path_factory.getbasetemp())


def tiny_config(data: Path, out: Path, loss: str, params: dict | None = None, **extra):
    """Small real backbone (MobileFaceNet, width 0.25, 56 px input), one thread, no workers."""
    overrides = [
        f"data.root={data}",
        "data.workers=0",
        "data.size=56",
        "data.flip=false",
        "backbone.name=mobilefacenet",
        "backbone.embedding_dim=32",
        "backbone.params={width: 0.25}",
        f"loss.name={loss}",
        f"loss.params={json.dumps(params or {})}",
        "batch_size=16",
        "threads=1",
        "progress=false",
        f"output={out}",
        "optim.lr=0.05",
        "optim.schedule=constant",
        "optim.weight_decay=0",
    ]
    overrides += [f"{k}={json.dumps(v)}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_prepare_aligns_celeba_with_the_service_detector(celeba_tiny):
    info = json.loads((celeba_tiny / "dataset.json").read_text())
    assert info["detector"] == "yunet_2023mar"
    assert 2 * IDENTITIES <= info["images"] <= IDENTITIES * PER_IDENTITY
    assert info["aligned"] + len(info["no_face"]) + len(info["unreadable"]) == info["images"]
    crops = sorted(celeba_tiny.glob("*/*.png"))
    assert len(crops) == info["aligned"]
    image = cv2.imread(str(crops[0]))
    assert image.shape == (112, 112, 3)
    assert image.std() > 20


LOSSES = [
    ("softmax", {}, {}),
    # unnormalised weights (logit = alpha ||W_j|| cos): at the shared lr 0.05 the weight norms
    # grow until SGD oscillates (loss 0.21 at epoch 7, 1.76 at 12); 0.02 falls steadily
    ("l2softmax", {"alpha": 8.0}, {"optim.lr": 0.02}),
    ("lsoftmax", {"m": 2}, {}),
    ("normface", {"s": 16.0}, {}),
    ("sphereface", {"m": 4}, {}),
    ("cosface", {"s": 16.0, "m": 0.2}, {}),
    ("arcface", {"s": 16.0, "m": 0.3}, {}),
    ("combined", {"s": 16.0, "m1": 1.2, "m2": 0.2, "m3": 0.1}, {}),
    ("softmax", {}, {"loss.aux": {"name": "center", "weight": 0.05, "params": {"alpha": 0.5}}}),
    ("softmax", {}, {"loss.aux": {"name": "marginal", "weight": 1.0}, "loss.pk": [4, 4]}),
    ("triplet", {"margin": 0.2, "mining": "batch_hard"}, {"loss.pk": [4, 4]}),
    ("triplet", {"margin": 0.2, "mining": "semi_hard"}, {"loss.pk": [4, 4]}),
    ("arcface", {"s": 16.0, "m": 0.3}, {"loss.sample_rate": 0.5}),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "loss,params,extra", LOSSES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(LOSSES)]
)
def test_each_loss_falls_on_real_faces(celeba_tiny, tmp_path, loss, params, extra):
    from training.train import train

    # one identity-balanced batch repeated: the loss must go down as the net fits it
    cfg = tiny_config(
        celeba_tiny,
        tmp_path / "run",
        loss,
        params,
        epochs=12,
        **extra,
        **{"data.max_identities": 4, "data.min_images": 4},
    )
    cfg.batch_size = 16
    summary = train(cfg)
    losses = [h["loss"] for h in summary["history"]]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


@pytest.mark.timeout(300)
def test_resume_reproduces_an_uninterrupted_run(celeba_tiny, tmp_path):
    from training.train import train

    extra = {"data.max_identities": 4, "data.flip": True, "loss.sample_rate": 0.5}
    straight = train(
        tiny_config(celeba_tiny, tmp_path / "a", "cosface", {"s": 16.0}, epochs=3, **extra)
    )
    first = train(
        tiny_config(celeba_tiny, tmp_path / "b", "cosface", {"s": 16.0}, epochs=2, **extra)
    )
    assert (tmp_path / "b" / "last.pt").is_file()
    resumed = train(
        tiny_config(
            celeba_tiny, tmp_path / "b", "cosface", {"s": 16.0}, epochs=3, resume="auto", **extra
        )
    )
    assert resumed["history"][:2] == first["history"]
    assert resumed["steps"] == straight["steps"]
    assert resumed["history"][-1]["loss"] == pytest.approx(
        straight["history"][-1]["loss"], rel=1e-4
    )
    state = torch.load(tmp_path / "b" / "last.pt", map_location="cpu", weights_only=False)
    assert state["centres"].shape == (4, 32) and state["epoch"] == 3


def test_recordio_reader_round_trips_insightface_format(celeba_tiny, tmp_path):
    folder = FaceImageFolder(celeba_tiny)
    items = []
    for path, label in folder.samples[:7]:
        items.append(
            (
                path.read_bytes()
                if path.suffix == ".jpg"
                else cv2.imencode(".jpg", cv2.imread(str(path)))[1].tobytes(),
                label,
            )
        )
    write_recordio(tmp_path / "rec", items)
    rec = RecordIODataset(tmp_path / "rec")
    assert len(rec) == 7
    assert rec.labels == [label for _, label in items]
    tensor, label = rec[3]
    assert tensor.shape == (3, 112, 112) and label == items[3][1]
    direct = cv2.imdecode(np.frombuffer(items[3][0], np.uint8), cv2.IMREAD_COLOR)
    expected = (direct[..., ::-1].astype(np.float32) - 127.5) / 128.0
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    (tmp_path / "rec" / "train.idx").unlink()
    with pytest.raises(FileNotFoundError):
        RecordIODataset(tmp_path / "rec")


def test_pk_sampler_builds_identity_balanced_batches():
    labels = [i // 5 for i in range(40)]  # 8 identities x 5
    sampler = PKSampler(labels, p=4, k=3, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler)
    for start in range(0, len(order), 12):
        batch = [labels[i] for i in order[start : start + 12]]
        counts = {lab: batch.count(lab) for lab in set(batch)}
        assert len(counts) == 4 and set(counts.values()) == {3}
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(ValueError):
        PKSampler(labels, p=9, k=2)


def test_config_rejects_unknown_keys_and_bad_losses(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["epochs"])
    (tmp_path / "c.yaml").write_text("epochs: 3\nloss: {name: cosface, params: {s: 30, m: 0.4}}\n")
    cfg = load_config(tmp_path / "c.yaml", ["loss.params.m=0.35"])
    assert cfg.epochs == 3 and cfg.loss.params == {"s": 30, "m": 0.35}


def test_bad_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        FaceImageFolder(tmp_path / "missing")
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        FaceImageFolder(tmp_path / "empty")
    shutil.rmtree(tmp_path / "empty")
