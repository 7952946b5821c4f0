"""Fine-tuning from the default recognizer: dlib's ResNet in PyTorch, ``init``, export, serving.

Real data throughout: LFW and CelebA photos aligned by the service's own detector
(MTCNN) and the ``dlib_resnet_v1`` card's crop contract, the converted ONNX default
model as the reference, a real ``facegate serve`` for the exported model.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import require_reference

torch = require_reference("torch", "the training package's framework (train extra)")

from tests.conftest import CELEBA, LFW  # noqa: E402
from tests.support.service import ServeProcess  # noqa: E402
from training.config import load_config  # noqa: E402

IDENTITIES = 6
PER_IDENTITY = 5
PAIRS = 40  # LFW fold 1: 20 same + 20 different


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lfw_pairs(tmp_path_factory, default_models_dir):
    """The first ``PAIRS`` pairs of LFW's fold 1, aligned with dlib_resnet_v1's crop contract."""
    from service.pipeline.pairs import parse_pairs
    from training import evaluate as ev
    from training.prepare import prepare

    pairs = [p for p in parse_pairs(LFW / "pairs.txt") if p.fold == 0]
    chosen = [p for p in pairs if p.same][: PAIRS // 2] + [p for p in pairs if not p.same][
        : PAIRS // 2
    ]
    keys = sorted({p.a for p in chosen} | {p.b for p in chosen})
    aligned = tmp_path_factory.mktemp("lfw150")
    report = prepare(
        LFW / "images",
        aligned,
        detector="mtcnn",
        model_dirs=[default_models_dir],
        keys=keys,
        progress=False,
        recognizer="dlib_resnet_v1",
    )
    assert report.aligned == len(keys), report
    pair_set = ev.load_pairs(LFW / "pairs.txt", aligned, folds=1, max_pairs_per_fold=PAIRS)
    return aligned, pair_set


@pytest.fixture(scope="module")
def celeba150(tmp_path_factory, default_models_dir) -> Path:
    from training.prepare import prepare

    dst = tmp_path_factory.mktemp("celeba150")
    names = sorted(p.name for p in (CELEBA / "images").iterdir() if p.is_dir())[:IDENTITIES]
    report = prepare(
        CELEBA / "images",
        dst,
        detector="mtcnn",
        model_dirs=[default_models_dir],
        limit_per_identity=PER_IDENTITY,
        identities=names,
        progress=False,
        recognizer="dlib_resnet_v1",
    )
    assert report.aligned >= IDENTITIES * 3, report
    return dst


def default_onnx(default_models_dir):
    from service.config import MANIFEST_PATH
    from service.registry import Registry

    return Registry(MANIFEST_PATH, [default_models_dir]).resolve("dlib_resnet_v1", "recognition")


def test_prepare_uses_the_cards_crop_contract(celeba150):
    import cv2

    from service.config import MANIFEST_PATH
    from service.registry import Registry

    card = Registry(MANIFEST_PATH, []).cards["dlib_resnet_v1"]
    info = json.loads((celeba150 / "dataset.json").read_text())
    assert info["recognizer"] == "dlib_resnet_v1" and info["detector"] == "mtcnn"
    assert tuple(info["size"]) == card.alignment.size == (150, 150)
    assert np.allclose(info["template"], card.alignment.template, atol=1e-3)
    crop = cv2.imread(str(sorted(celeba150.glob("*/*.png"))[0]))
    assert crop.shape == (150, 150, 3) and crop.std() > 20


@pytest.mark.timeout(300)
def test_dlib_resnet_forward_equals_the_shipped_onnx(
    lfw_pairs, default_models_dir, record_property
):
    """The PyTorch network with the weights read by the converter's parser reproduces the
    converted ONNX default on real aligned faces, normalised by the service's embedder."""
    import onnxruntime as ort

    from service.config import Settings
    from service.pipeline.embed import OnnxEmbedder
    from training.backbones.dlib_resnet import pretrained_dlib_resnet

    _, pair_set = lfw_pairs
    crops = pair_set.images[:24]
    card, path = default_onnx(default_models_dir)
    embedder = OnnxEmbedder(card, path, Settings(providers=["CPUExecutionProvider"]), flip=False)
    blob = embedder.preprocess(crops)  # the card's preprocessing, as the service applies it
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: blob})[0]
    model = pretrained_dlib_resnet().eval()
    with torch.inference_mode():
        got = model(torch.from_numpy(blob)).numpy()
    max_abs = float(np.abs(got - reference).max())
    cosine = np.sum(got * reference, 1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
    )
    record_property("dlib_resnet_max_abs_diff", max_abs)
    record_property("dlib_resnet_min_cosine", float(cosine.min()))
    record_property("dlib_resnet_max_abs_output", float(np.abs(reference).max()))
    assert got.shape == (24, 128)
    assert max_abs < 1e-4 and float(cosine.min()) > 0.999999


def finetune_config(data: Path, out: Path, lfw_dir: Path, **extra):
    overrides = [
        f"data.root={data}",
        "data.workers=0",
        "data.size=150",
        "data.flip=false",
        "backbone.name=dlib_resnet",
        "backbone.embedding_dim=128",
        "loss.name=cosface",
        "loss.params={s: 30.0, m: 0.2}",
        "batch_size=8",
        "threads=1",
        "progress=false",
        f"output={out}",
        "optim.lr=0.01",
        "optim.backbone_lr_mult=0.1",
        "optim.schedule=constant",
        "optim.weight_decay=0",
        "epochs=1",
        "max_steps=1",
        f"eval.pairs={LFW / 'pairs.txt'}",
        f"eval.aligned={lfw_dir}",
        "eval.folds=1",
        f"eval.max_pairs_per_fold={PAIRS}",
    ]
    overrides += [f"{k}={json.dumps(v)}" for k, v in extra.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, celeba150, lfw_pairs):
    """One step of CosFace from dlib_resnet_v1 with the stem frozen."""
    from training.train import train

    out = tmp_path_factory.mktemp("finetune")
    cfg = finetune_config(
        celeba150, out, lfw_pairs[0], init="dlib_resnet_v1", **{"backbone.freeze": ["stem"]}
    )
    summary = train(cfg)
    return out / "last.pt", summary


@pytest.mark.timeout(600)
def test_finetune_starts_from_the_default(
    finetuned, lfw_pairs, celeba150, default_models_dir, record_property
):
    """After one small step the LFW-subset accuracy is the default's (not chance), the centres
    started at each identity's mean embedding, frozen stages did not move, others did."""
    from training import evaluate as ev
    from training.backbones.dlib_resnet import pretrained_dlib_resnet

    checkpoint, summary = finetuned
    _, pair_set = lfw_pairs
    card, path = default_onnx(default_models_dir)
    default = ev.evaluate_model(ev.onnx_embedder(card, path), pair_set, calibrate=False)
    first_step = summary["history"][-1]["eval_accuracy"]
    record_property("lfw_subset_default_accuracy", default["accuracy"])
    record_property("lfw_subset_first_step_accuracy", first_step)
    assert default["accuracy"] >= 0.9
    assert abs(first_step - default["accuracy"]) <= 1.0 / PAIRS + 1e-9

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    pretrained = pretrained_dlib_resnet().state_dict()
    tuned = state["backbone"]
    assert all(torch.equal(tuned[k], pretrained[k]) for k in tuned if k.startswith("stem."))
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned if k.startswith("level5."))

    # the centres: the ONNX default's mean normalised embedding per identity, moved by one step
    # of lr 0.01 at most
    import cv2

    onnx_embed = ev.onnx_embedder(card, path)
    centres = []
    for identity in state["classes"]:
        crops = np.stack([cv2.imread(str(f)) for f in sorted((celeba150 / identity).glob("*.png"))])
        vectors = onnx_embed(crops)
        mean = vectors.mean(0)
        centres.append(mean / np.linalg.norm(mean))
    saved = torch.nn.functional.normalize(state["centres"], dim=1).numpy()
    cosines = np.sum(saved * np.stack(centres), 1)
    record_property("centre_cosine_min", float(cosines.min()))
    assert cosines.min() > 0.99


@pytest.mark.timeout(600)
def test_init_from_a_checkpoint(finetuned, celeba150, lfw_pairs, tmp_path):
    """``init`` takes a checkpoint of this package; a frozen warm-up step leaves it unchanged;
    a checkpoint of another backbone is refused."""
    from training.train import train

    checkpoint, _ = finetuned
    cfg = finetune_config(
        celeba150,
        tmp_path / "again",
        lfw_pairs[0],
        init=str(checkpoint),
        **{"optim.freeze_epochs": 1, "eval.pairs": ""},
    )
    train(cfg)
    before = torch.load(checkpoint, map_location="cpu", weights_only=False)["backbone"]
    after = torch.load(tmp_path / "again" / "last.pt", map_location="cpu", weights_only=False)[
        "backbone"
    ]
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    from training.backbones.dlib_resnet import pretrained_dlib_resnet

    pretrained = pretrained_dlib_resnet().state_dict()
    assert any(not torch.equal(after[k], pretrained[k]) for k in after)

    other = finetune_config(
        celeba150,
        tmp_path / "other",
        lfw_pairs[0],
        init=str(checkpoint),
        **{"backbone.name": "mobilefacenet", "data.size": 112, "eval.pairs": ""},
    )
    with pytest.raises(ValueError, match="cannot start"):
        train(other)


@pytest.mark.timeout(600)
def test_export_keeps_the_contract_and_the_service_serves_it(
    finetuned, lfw_pairs, default_models_dir, tmp_path
):
    """The exported card has dlib_resnet_v1's crop and preprocessing; ``facegate serve`` loads
    it through FACEGATE_RECOGNIZER and /v1/verify tells the same person from another."""
    from service.config import MANIFEST_PATH
    from service.registry import ModelCard, Registry
    from training.export import export

    checkpoint, _ = finetuned
    _, pair_set = lfw_pairs
    models = tmp_path / "models"
    onnx_path = models / "tiny_dlib_cosface.onnx"
    result = export(checkpoint, onnx_path, pair_set.images[:8])
    assert result["parity"]["max_abs_diff"] < 1e-3
    card = ModelCard.model_validate_json((models / "tiny_dlib_cosface.card.json").read_text())
    default = Registry(MANIFEST_PATH, []).cards["dlib_resnet_v1"]
    assert card.preprocessing == default.preprocessing
    assert card.alignment == default.alignment and card.embedding_dim == 128
    assert card.training["init"] == "dlib_resnet_v1"

    env = {
        "FACEGATE_MODELS_DIR": str(default_models_dir),
        "FACEGATE_DETECTOR": "mtcnn",
        "FACEGATE_RECOGNIZER": str(onnx_path),
    }
    server = ServeProcess(tmp_path / "serve", env=env).start(timeout=120)
    try:

        def photo(name: str, number: int) -> tuple[str, bytes]:
            return "f.jpg", (LFW / "images" / name / f"{name}_{number:04d}.jpg").read_bytes()

        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            info = client.get("/v1/info").json()
            assert info["models"]["recognizer"]["name"] == "tiny_dlib_cosface"
            same = client.post(
                "/v1/verify",
                files={"image1": photo("Abel_Pacheco", 1), "image2": photo("Abel_Pacheco", 4)},
            )
            diff = client.post(
                "/v1/verify",
                files={"image1": photo("Abel_Pacheco", 1), "image2": photo("Akhmed_Zakayev", 1)},
            )
            assert same.status_code == diff.status_code == 200, same.text
            assert same.json()["model"].startswith("tiny_dlib_cosface@")
            assert same.json()["similarity"] > diff.json()["similarity"]
    finally:
        server.stop()
