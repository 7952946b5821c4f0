"""Alignment (vs InsightFace's norm_crop), embedding batching, flip augmentation, checksums."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from insightface.utils import face_align
from onnx import TensorProto, helper, numpy_helper

from service.config import MANIFEST_PATH, Settings
from service.pipeline.align import ARCFACE_TEMPLATE, align_faces, estimate_similarity
from service.pipeline.embed import OnnxEmbedder
from service.pipeline.pipeline import Pipeline
from service.registry import ModelCard, ModelError, Registry, sha256_file
from tests.conftest import GROUP_PHOTO, LFW, SHARED_MODELS
from tests.pipeline.test_detectors import lfw_sample


@pytest.fixture(scope="module")
def pipeline(shared_registry) -> Pipeline:
    settings = Settings(detector="scrfd_2.5g_bnkps", recognizer="mobilefacenet_peer_128d")
    return Pipeline.from_settings(settings, shared_registry)


def lfw(name: str, number: int) -> np.ndarray:
    return cv2.imread(str(LFW / "images" / name / f"{name}_{number:04d}.jpg"))


def test_estimate_similarity_recovers_a_known_transform():
    angle, scale, shift = np.deg2rad(17.0), 1.7, np.array([31.0, -12.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = ARCFACE_TEMPLATE @ rot.T + shift
    matrix = estimate_similarity(landmarks, ARCFACE_TEMPLATE)
    mapped = landmarks @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, ARCFACE_TEMPLATE, atol=1e-4)
    with pytest.raises(ValueError):
        estimate_similarity(np.zeros((5, 2)), np.zeros((4, 2)))


def assert_crops_match_norm_crop(pipeline, image, faces) -> np.ndarray:
    """Every face's crop against InsightFace's ``norm_crop``; their mean absolute differences."""
    crops = pipeline.align(image, faces)
    assert crops.shape == (len(faces), 112, 112, 3) and crops.dtype == np.uint8
    errors = []
    for crop, face in zip(crops, faces, strict=True):
        reference = face_align.norm_crop(image, face.landmarks)
        errors.append(np.abs(crop.astype(int) - reference.astype(int)).mean())
    assert max(errors, default=0.0) <= 1.0, errors
    return np.asarray(errors)


def test_aligned_crops_match_insightface_norm_crop(pipeline):
    image = cv2.imread(str(GROUP_PHOTO))
    faces = pipeline.detect(image)
    assert len(faces) == 6
    assert_crops_match_norm_crop(pipeline, image, faces)


def test_aligned_crops_match_insightface_norm_crop_on_100_lfw_images(pipeline):
    images = lfw_sample(100)
    assert len(images) == 100
    errors, without_face = [], 0
    for image in images:
        faces = pipeline.detect(image)
        without_face += not faces
        errors.extend(assert_crops_match_norm_crop(pipeline, image, faces))
    assert without_face <= 2 and len(errors) >= 98
    print(
        f"\n{len(errors)} LFW crops vs norm_crop: mean abs difference "
        f"{np.mean(errors):.3f}, max {np.max(errors):.3f} grey levels"
    )


def test_other_template_and_size():
    image = lfw("Abel_Pacheco", 1)
    landmarks = ARCFACE_TEMPLATE * 1.5 + 40
    template = ARCFACE_TEMPLATE * (150 / 112)
    crop = align_faces(image, [landmarks], template, (150, 150))[0]
    assert crop.shape == (150, 150, 3)
    # The chip is the image region around the landmarks, scaled by 150/112/1.5.
    matrix = estimate_similarity(landmarks, template)
    assert abs(matrix[0, 0] - (150 / 112) / 1.5) < 1e-6 and abs(matrix[0, 1]) < 1e-6


def test_peer_embeddings_separate_identities(pipeline):
    def embedding(name, number):
        image = lfw(name, number)
        faces = pipeline.detect(image)
        return pipeline.embed(pipeline.align(image, faces[:1]))[0]

    same_a, same_b = embedding("Abel_Pacheco", 1), embedding("Abel_Pacheco", 4)
    other = embedding("Aaron_Peirsol", 1)
    assert same_a.dtype == np.float32 and same_a.shape == (128,)
    assert abs(np.linalg.norm(same_a) - 1) < 1e-5
    assert same_a @ same_b > 0.45 and same_a @ other < 0.2


def test_fixed_batch_model_batch_equals_one_by_one(pipeline):
    image = cv2.imread(str(GROUP_PHOTO))
    crops = pipeline.align(image, pipeline.detect(image))
    batched = pipeline.embed(crops)
    single = np.concatenate([pipeline.embed(c[None]) for c in crops])
    np.testing.assert_allclose(batched, single, atol=1e-4)
    assert batched.shape == (6, 128)


def test_flip_augmentation(shared_registry, pipeline):
    card, path = shared_registry.resolve("mobilefacenet_peer_128d")
    flipper = OnnxEmbedder(card, path, Settings(flip_augment=True))
    image = cv2.imread(str(GROUP_PHOTO))
    crops = pipeline.align(image, pipeline.detect(image))
    plain = pipeline.embedder
    raw = plain._forward(plain.preprocess(crops)) + plain._forward(
        plain.preprocess(crops[:, :, ::-1])
    )
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    flipped = flipper.embed(crops)
    np.testing.assert_allclose(flipped, expected, atol=1e-5)
    # A flip-augmented embedding is invariant to mirroring the crop, the plain one is not.
    np.testing.assert_allclose(flipper.embed(crops[:, :, ::-1]), flipped, atol=1e-5)
    assert np.abs(plain.embed(crops[:, :, ::-1]) - plain.embed(crops)).max() > 1e-2
    np.testing.assert_allclose(plain.embed(crops, flip=True), flipped, atol=1e-5)


def tiny_dynamic_model(path: Path) -> ModelCard:
    """A 16-d conv+linear "recognizer" with a symbolic batch dimension."""
    rng = np.random.default_rng(7)
    conv = numpy_helper.from_array(rng.normal(0, 0.1, (8, 3, 8, 8)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(0, 0.1, (8 * 14 * 14, 16)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], strides=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 112, 112])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 16])],
        [conv, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return ModelCard(
        name="tiny",
        task="recognition",
        family="arcface",
        file=path.name,
        sha256=sha256_file(path),
        embedding_dim=16,
    )


def test_dynamic_batch_model_chunks_equal_one_by_one(tmp_path, pipeline):
    card = tiny_dynamic_model(tmp_path / "tiny.onnx")
    embedder = OnnxEmbedder(card, tmp_path / "tiny.onnx", Settings(max_batch=3))
    assert embedder.fixed_batch is None and embedder.dim == 16
    image = cv2.imread(str(GROUP_PHOTO))
    crops = pipeline.align(image, pipeline.detect(image))
    crops = np.concatenate([crops, crops[:1]])  # 7 crops: chunks of 3, 3, 1
    batched = embedder.embed(crops)
    single = np.concatenate([embedder.embed(c[None]) for c in crops])
    np.testing.assert_allclose(batched, single, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert embedder.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 16)


def test_pipeline_refuses_a_tampered_model(tmp_path):
    for name in ("mobilefacenet_peer_128d.onnx", "scrfd_2.5g_bnkps.onnx"):
        shutil.copyfile(SHARED_MODELS / name, tmp_path / name)
    with open(tmp_path / "mobilefacenet_peer_128d.onnx", "r+b") as fh:
        fh.seek(5000)
        byte = fh.read(1)
        fh.seek(5000)
        fh.write(bytes([byte[0] ^ 0x01]))
    settings = Settings(
        models_dir=tmp_path, detector="scrfd_2.5g_bnkps", recognizer="mobilefacenet_peer_128d"
    )
    with pytest.raises(ModelError, match="checksum mismatch"):
        Pipeline.from_settings(settings, Registry(MANIFEST_PATH, [tmp_path]))


def test_analyze_reports_every_face_and_stage_timings(pipeline):
    from service.pipeline.types import Timings

    timings = Timings()
    faces = pipeline.analyze(GROUP_PHOTO.read_bytes(), "all", timings)
    assert faces.image_size == (1280, 886) and len(faces.detections) == faces.detected == 6
    areas = [d.area for d in faces.detections]
    assert areas == sorted(areas, reverse=True)  # policy "all": largest first
    assert set(timings.stages) == {"decode", "detect", "align", "embed"}
    assert all(v > 0 for v in timings.stages.values())
    assert sum(timings.stages.values()) <= timings.elapsed()
    embeddings = faces.embeddings
    gram = embeddings @ embeddings.T
    assert np.abs(np.diag(gram) - 1).max() < 1e-5 and (gram - np.eye(6)).max() < 0.6  # 6 people
    lfw = (LFW / "images" / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg").read_bytes()
    batch = pipeline.locate_batch([GROUP_PHOTO.read_bytes(), b"not an image", lfw])
    assert batch[1].code == "unsupported_image_type"
    located = [batch[0], batch[2]]
    pipeline.embed_faces(located)
    assert [len(f.detections) for f in located] == [6, 1]
    np.testing.assert_allclose(located[0].embeddings, embeddings, atol=1e-4)
