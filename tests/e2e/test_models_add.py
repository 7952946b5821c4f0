"""``facegate models add``: real files of ``../shared/models`` added from copies under new names
with the catalogue off, served on real uvicorn servers; an InsightFace-style pack folder; the
preprocessing search against the manifest's record; bad inputs refused with nothing written.

One models directory is shared by the module: the four shared detectors and the peer
recognizer are added once (the peer's preprocessing measured on 100 CelebA photos), then
each detector serves ``/v1/verify`` with the peer on an in-process uvicorn server, and one
``facegate serve`` subprocess serves them by ``FACEGATE_DETECTOR`` / ``FACEGATE_RECOGNIZER``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.config import MANIFEST_PATH, Settings
from service.registry import ModelError, Registry
from service.usecases.models_add import AddError, add_models
from service.usecases.preprocessing_search import SampleError, sample_from_dir, sample_from_pairs
from tests.conftest import CELEBA, LFW, REPO, SHARED_MODELS, photo
from tests.support.service import InProcessServer, ServeProcess

#: shared file -> (new name, family the manifest records)
DETECTORS = {
    "yunet_2023mar.onnx": ("copied_yunet", "yunet"),
    "scrfd_500m_bnkps_640.onnx": ("copied_scrfd_500m", "scrfd"),
    "scrfd_2.5g_bnkps.onnx": ("copied_scrfd_2g5", "scrfd"),
    "retinaface_mnet025.onnx": ("copied_retinaface", "retinaface"),
}
PEER = "mobilefacenet_peer_128d.onnx"
PEER_NAME = "copied_peer"
#: CelebA persons x 4 photos for the preprocessing search
SAMPLE_IMAGES = 100
SAME = ("Colin_Powell", 1), ("Colin_Powell", 2)
DIFFERENT = ("Colin_Powell", 1), ("Angela_Merkel", 1)
CPU = ["CPUExecutionProvider"]


def manifest_card(name: str):
    """The repository manifest's card: the reference for what a search must find."""
    return Registry(MANIFEST_PATH, []).cards[name]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "models", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def files_in(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(scope="module")
def added(tmp_path_factory):
    """Copies of the shared files under new names, added (catalogue off) into one directory."""
    sources = tmp_path_factory.mktemp("sources")
    models_dir = tmp_path_factory.mktemp("models")
    settings = Settings(models_dir=models_dir, providers=CPU)
    results = {}
    for shared_name, (name, _) in DETECTORS.items():
        copy = sources / f"some_download_{name}.onnx"
        shutil.copyfile(SHARED_MODELS / shared_name, copy)
        registry = Registry(MANIFEST_PATH, [models_dir])
        results[name] = add_models(copy, settings, registry, name=name, catalogue=False)
    peer = sources / "unknown_recognizer.onnx"
    shutil.copyfile(SHARED_MODELS / PEER, peer)
    done = cli(
        "add",
        str(peer),
        "--name",
        PEER_NAME,
        "--no-catalogue",
        "--models-dir",
        str(models_dir),
        "--detector",
        "copied_yunet",
        "--calibrate",
        str(CELEBA / "images"),
        "--sample-images",
        str(SAMPLE_IMAGES),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    return models_dir, results, json.loads(done.stdout)


def test_detectors_classified_as_the_manifest_records(added):
    _, results, _ = added
    for shared_name, (name, family) in DETECTORS.items():
        [model] = results[name].added
        listed = manifest_card(shared_name.removesuffix(".onnx"))
        assert model.card.family == family == listed.family
        # the family's published convention is the manifest's preprocessing for each file
        assert model.card.preprocessing.color == listed.preprocessing.color
        assert model.card.preprocessing.mean == listed.preprocessing.mean
        assert model.card.preprocessing.std == listed.preprocessing.std
        assert model.card.preprocessing.input_size == listed.preprocessing.input_size
        assert model.card.licence == "unknown"
        assert model.catalogue is None


def test_search_picks_the_manifest_preprocessing_for_the_peer(added, record_property):
    models_dir, _, report = added
    [peer] = report["added"]
    listed = manifest_card("mobilefacenet_peer_128d")
    card = json.loads((models_dir / f"{PEER_NAME}.card.json").read_text())
    assert card["preprocessing"]["color"] == listed.preprocessing.color == "RGB"
    assert tuple(card["preprocessing"]["mean"]) == listed.preprocessing.mean
    assert tuple(card["preprocessing"]["std"]) == listed.preprocessing.std
    assert listed.alignment is not None
    assert np.allclose(card["alignment"]["template"], listed.alignment.template)
    assert card["embedding_dim"] == listed.embedding_dim == 128
    assert card["sha256"] == listed.sha256 and card["licence"] == "unknown"
    search = peer["search"]
    assert len(search["candidates"]) == 16  # 2 colours x 4 normalisations x 2 crops
    best = search["candidates"][search["chosen"]]
    runner = max(
        (c for i, c in enumerate(search["candidates"]) if i != search["chosen"]),
        key=lambda c: c["auc"],
    )
    record_property("peer search AUC best / runner-up", f"{best['auc']:.4f} / {runner['auc']:.4f}")
    # thresholds only where the sample's impostor pairs support them (rule of 30)
    assert set(card["thresholds"]) == {"fmr_1e-2"}
    assert "preprocessing search" in card["evaluation"]["thresholds_source"]


def test_models_list_shows_the_added_models(added):
    models_dir, _, _ = added
    done = cli("list", "--json", "--models-dir", str(models_dir))
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    for name in [PEER_NAME, *(n for n, _ in DETECTORS.values())]:
        assert rows[name]["found"] and rows[name]["sha_ok"], rows[name]


def _verify(base_url: str, a: tuple[str, int], b: tuple[str, int]) -> dict:
    files = {"image1": ("a.jpg", photo(*a)), "image2": ("b.jpg", photo(*b))}
    response = httpx.post(f"{base_url}/v1/verify", files=files, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("detector", [name for name, _ in DETECTORS.values()])
def test_each_added_detector_serves_verify_with_the_added_peer(added, detector, tmp_path):
    models_dir, _, _ = added
    settings = Settings(
        models_dir=models_dir,
        detector=detector,
        recognizer=PEER_NAME,
        providers=CPU,
        data_dir=tmp_path,
    )
    server = InProcessServer(settings).start()
    try:
        same = _verify(server.base_url, *SAME)
        different = _verify(server.base_url, *DIFFERENT)
    finally:
        server.stop()
    assert same["match"] is True and different["match"] is False, (same, different)
    assert same["operating_point"] == "fmr_1e-2" and same["model"].startswith(PEER_NAME)


def test_serve_by_name_and_refuse_a_changed_file(added, tmp_path):
    models_dir, _, _ = added
    env = {"FACEGATE_MODELS_DIR": str(models_dir), "FACEGATE_DETECTOR": "copied_scrfd_2g5"}
    server = ServeProcess(tmp_path / "data", {**env, "FACEGATE_RECOGNIZER": PEER_NAME}).start()
    try:
        info = httpx.get(f"{server.base_url}/v1/info", timeout=10).json()
        same = _verify(server.base_url, *SAME)
    finally:
        server.stop()
    assert same["match"] is True
    assert json.dumps(info).count(PEER_NAME) >= 1 and "copied_scrfd_2g5" in json.dumps(info)
    # the same card beside a file whose bytes changed: refused at start-up
    changed = tmp_path / "changed"
    changed.mkdir()
    shutil.copyfile(models_dir / f"{PEER_NAME}.card.json", changed / f"{PEER_NAME}.card.json")
    data = bytearray((models_dir / f"{PEER_NAME}.onnx").read_bytes())
    data[-1] ^= 0xFF
    (changed / f"{PEER_NAME}.onnx").write_bytes(bytes(data))
    from service.pipeline.pipeline import Pipeline

    with pytest.raises(ModelError, match="checksum mismatch"):
        Pipeline.from_settings(
            Settings(
                models_dir=changed,
                detector=str(SHARED_MODELS / "yunet_2023mar.onnx"),
                recognizer=PEER_NAME,
                providers=CPU,
            )
        )


def _tiny_model(path, in_shape, out_values: int, head: str | None = None) -> None:
    """N×3×H×W -> global average pool -> 3 values -> MatMul -> ``out_values`` (-> ``head``)."""
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((3, out_values)).astype(np.float32), "w"
    )
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["y" if head is None else "logits"]),
    ]
    if head is not None:
        nodes.append(helper.make_node(head, ["logits"], ["y"], axis=1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [in_shape[0], out_values])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def test_pack_folder_adds_detector_and_recognizer_and_skips_the_rest(tmp_path):
    pack = tmp_path / "buffalo_test"
    pack.mkdir()
    shutil.copyfile(SHARED_MODELS / "scrfd_500m_bnkps_640.onnx", pack / "det_500m.onnx")
    shutil.copyfile(SHARED_MODELS / PEER, pack / "w600k_peer.onnx")
    _tiny_model(pack / "2d106det.onnx", [1, 3, 192, 192], 212)
    _tiny_model(pack / "genderage.onnx", [1, 3, 96, 96], 3)
    models_dir = tmp_path / "models"
    lfw = LFW / "pairs.txt", LFW / "images"
    done = cli(
        *("add", str(pack), "--models-dir", str(models_dir), "--no-catalogue"),
        *("--pairs", str(lfw[0]), "--images", str(lfw[1]), "--sample-images", "40"),
    )
    assert done.returncode == 0, done.stderr
    assert "skipped 2d106det.onnx: landmark" in done.stdout
    assert "skipped genderage.onnx: attribute" in done.stdout
    # the pack's own detector checked on the sample and used for the recognizer's search;
    # the shared LFW copy is grayscale: only the 8 colour-free candidates, and it says so
    assert "detector check: a face in" in done.stdout
    assert done.stdout.count("TMR@FMR1e-2") == 8 and "grayscale" in done.stdout
    assert files_in(models_dir) == [
        "buffalo_test_det.card.json",
        "buffalo_test_det.onnx",
        "buffalo_test_rec.card.json",
        "buffalo_test_rec.onnx",
    ]
    from service.pipeline.pipeline import Pipeline

    pipeline = Pipeline.from_settings(
        Settings(
            models_dir=models_dir,
            detector="buffalo_test_det",
            recognizer="buffalo_test_rec",
            providers=CPU,
        )
    )
    assert pipeline.detector_card.family == "scrfd"
    a, b = (pipeline.analyze(photo(*p), "largest") for p in SAME)
    assert a.embeddings is not None and b.embeddings is not None
    assert float(a.embeddings[0] @ b.embeddings[0]) > 0.3  # same person, far from chance


def test_routing_agrees_with_insightface(tmp_path):
    """insightface.model_zoo's router (the reference) sorts the shared files and a landmark
    model as the classifier does."""
    from insightface.model_zoo import model_zoo

    from service.convert.classify import classify

    landmark = tmp_path / "2d106det.onnx"
    _tiny_model(landmark, [1, 3, 192, 192], 212)
    tasks = {"detection": "detection", "recognition": "recognition", "landmark_2d_106": "landmark"}
    for path in [SHARED_MODELS / "scrfd_2.5g_bnkps.onnx", SHARED_MODELS / PEER, landmark]:
        routed = model_zoo.ModelRouter(str(path)).get_model(providers=CPU)
        assert tasks.get(routed.taskname, routed.taskname) == classify(path).kind, path


def test_bad_inputs_each_refused_with_nothing_written(tmp_path):
    models_dir = tmp_path / "models"
    settings = Settings(models_dir=models_dir, providers=CPU)
    registry = Registry(MANIFEST_PATH, [models_dir])
    not_onnx = tmp_path / "weights.onnx"
    not_onnx.write_bytes(b"PK\x03\x04 this is a zip, not a protobuf" * 40)
    classifier = tmp_path / "classifier.onnx"
    _tiny_model(classifier, [1, 3, 112, 112], 10, head="Softmax")
    dynamic = tmp_path / "dynamic.onnx"
    _tiny_model(dynamic, ["N", 3, "H", "W"], 128)
    cases = [
        (not_onnx, {}, "not an ONNX model"),
        (classifier, {}, "classifier"),
        (dynamic, {}, "cannot be resolved"),
        (tmp_path / "missing.onnx", {}, "no such file"),
        (SHARED_MODELS / PEER, {"name": "yunet_2023mar"}, "taken by the repository's manifest"),
        (SHARED_MODELS / PEER, {"name": "../escape"}, "model name"),
    ]
    for path, options, message in cases:
        with pytest.raises(AddError, match=message):
            add_models(path, settings, registry, catalogue=False, **options)
        assert files_in(models_dir) == [], (path, message)
    # a name already in the models directory: refused without --replace, kept as it was
    add_models(
        SHARED_MODELS / "yunet_2023mar.onnx", settings, registry, name="taken", catalogue=False
    )
    before = (models_dir / "taken.card.json").read_text()
    done = cli(
        "add",
        str(SHARED_MODELS / "scrfd_500m_bnkps_640.onnx"),
        "--name",
        "taken",
        "--models-dir",
        str(models_dir),
        "--no-catalogue",
    )
    assert (
        done.returncode == 1 and "is taken" in done.stderr and "nothing was written" in done.stderr
    )
    assert (models_dir / "taken.card.json").read_text() == before
    registry = Registry(MANIFEST_PATH, [models_dir])
    replaced = add_models(
        SHARED_MODELS / "scrfd_500m_bnkps_640.onnx",
        settings,
        registry,
        name="taken",
        catalogue=False,
        replace=True,
    )
    assert replaced.added[0].card.family == "scrfd"
    # a recognizer added without a labelled sample: written, its guess and lack of
    # thresholds said
    [guessed] = add_models(
        SHARED_MODELS / PEER, settings, registry, name="guessed", catalogue=False
    ).added
    assert guessed.card.thresholds == {} and any("NOT measured" in n for n in guessed.notes)
    # a labelled sample of one person cannot drive a search
    one_person = tmp_path / "one"
    (one_person / "ada").mkdir(parents=True)
    with pytest.raises(SampleError, match="two persons"):
        sample_from_dir(one_person)


def test_catalogue_names_a_known_file_with_its_sources(tmp_path):
    """With the catalogue on, a copy of the shared YuNet under another file name is known by
    its sha256: the manifest's model (its file installed, the manifest's card serves it)."""
    models_dir = tmp_path / "models"
    copy = tmp_path / "face_detection_yunet_2023mar.onnx"
    shutil.copyfile(SHARED_MODELS / "yunet_2023mar.onnx", copy)
    settings = Settings(models_dir=models_dir, providers=CPU)
    result = add_models(copy, settings, Registry(MANIFEST_PATH, [models_dir]))
    [model] = result.added
    assert model.catalogue is not None and model.catalogue["name"] == "yunet_2023mar"
    assert all(model.catalogue["published"].values())
    assert model.card_path is None and files_in(models_dir) == ["yunet_2023mar.onnx"]
    # under a new name: a card with the catalogue's licence and preprocessing
    named = add_models(copy, settings, Registry(MANIFEST_PATH, [models_dir]), name="my_yunet")
    card = named.added[0].card
    assert card.licence == "MIT" and card.commercial_use is True
    assert card.preprocessing.color == "BGR"
    assert "catalogue" in card.evaluation["models_add"]


def test_a_model_no_candidate_suits_is_reported_not_hidden(tmp_path):
    """A graph that is shaped like a recognizer but embeds nothing of the face (mean colour
    through random weights): the search still picks a candidate, and says it is poor."""
    fake = tmp_path / "fake_recognizer.onnx"
    _tiny_model(fake, [1, 3, 112, 112], 128)
    settings = Settings(
        models_dir=tmp_path / "models",
        detector=str(SHARED_MODELS / "yunet_2023mar.onnx"),
        providers=CPU,
    )
    sample = sample_from_pairs(LFW / "pairs.txt", LFW / "images", 40)
    [model] = add_models(
        fake, settings, Registry(MANIFEST_PATH, []), sample=sample, catalogue=False
    ).added
    assert model.search is not None and len(model.search.candidates) == 8
    assert model.search.best.auc < 0.9
    assert any("separates same from different people poorly" in w for w in model.search.warnings)
    # a sample photo that cannot be decoded is named, and nothing is written
    photos = tmp_path / "photos"
    for person in ("ada", "bob"):
        (photos / person).mkdir(parents=True)
        (photos / person / "1.jpg").write_bytes(photo("Colin_Powell", 1))
    (photos / "bob" / "2.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SampleError, match="sample photo .*2.jpg"):
        add_models(
            fake,
            settings,
            Registry(MANIFEST_PATH, []),
            name="other",
            sample=sample_from_dir(photos),
            catalogue=False,
        )
    assert files_in(tmp_path / "models") == ["fake_recognizer.card.json", "fake_recognizer.onnx"]


def test_a_broken_card_in_the_models_directory_is_named_at_start_up(tmp_path):
    (tmp_path / "half_written.card.json").write_text('{"name": "half_written", "task": ')
    with pytest.raises(ModelError, match="half_written.card.json: not a valid model card"):
        Registry(MANIFEST_PATH, [tmp_path])
