"""Every detector family on real photos; SCRFD parity with InsightFace; YuNet parity with OpenCV."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.config import Settings
from service.pipeline.detectors import build_detector, detector_class
from service.pipeline.detectors.base import letterbox
from tests.conftest import GROUP_PHOTO, LFW, SHARED_MODELS

DETECTORS = ["yunet_2023mar", "scrfd_500m_bnkps_640", "scrfd_2.5g_bnkps", "retinaface_mnet025"]


def lfw_sample(count: int, step: int = 77) -> list[np.ndarray]:
    paths = sorted((LFW / "images").glob("*/*.jpg"))[::step][:count]
    return [cv2.imread(str(p)) for p in paths]


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.fixture(scope="module")
def group_photo() -> np.ndarray:
    image = cv2.imread(str(GROUP_PHOTO))
    assert image is not None
    return image


@pytest.fixture(scope="module")
def lfw_images() -> list[np.ndarray]:
    return lfw_sample(100)


_cache: dict = {}


def detector(shared_registry, name: str, **overrides):
    key = (name, tuple(sorted(overrides.items())))
    if key not in _cache:
        card, path = shared_registry.resolve(name, task="detection")
        _cache[key] = build_detector(card, path, Settings(**overrides))
    return _cache[key]


def assert_plausible_face(det, image_shape):
    lm = det.landmarks
    assert lm.shape == (5, 2) and det.box.shape == (4,)
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # left eye/mouth left of right ones
    assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])  # eyes, nose, mouth
    x1, y1, x2, y2 = det.box
    assert (x1 - 5 <= lm[:, 0]).all() and (lm[:, 0] <= x2 + 5).all()
    assert (y1 - 5 <= lm[:, 1]).all() and (lm[:, 1] <= y2 + 5).all()


@pytest.mark.parametrize("name", DETECTORS)
def test_group_photo_has_six_faces(shared_registry, group_photo, name):
    faces = detector(shared_registry, name).detect(group_photo)
    assert len(faces) == 6
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.5
    for face in faces:
        assert_plausible_face(face, group_photo.shape)
        assert 60 < face.width < 160


@pytest.mark.parametrize("name", DETECTORS)
def test_lfw_centre_face_and_cross_detector_agreement(shared_registry, name):
    images = lfw_sample(12)
    reference = detector(shared_registry, "scrfd_500m_bnkps_640")
    for image in images:
        faces = detector(shared_registry, name).detect(image)
        assert faces, "the labelled LFW face must be found"
        centre = min(faces, key=lambda f: np.abs(f.landmarks[2] - 125).sum())
        assert_plausible_face(centre, image.shape)
        assert np.abs(centre.landmarks[2] - 125).max() < 35  # LFW faces are centred
        ref = min(reference.detect(image), key=lambda f: np.abs(f.landmarks[2] - 125).sum())
        # Different detectors, one face: landmarks agree to a few pixels on 250x250 photos.
        assert np.abs(centre.landmarks - ref.landmarks).mean() < 5.0
        assert box_iou(centre.box, ref.box) > 0.6


@pytest.mark.parametrize("name", ["scrfd_500m_bnkps_640", "scrfd_2.5g_bnkps"])
def test_scrfd_parity_with_insightface(shared_registry, group_photo, lfw_images, name):
    from insightface.model_zoo.scrfd import SCRFD

    ours = detector(shared_registry, name)
    reference = SCRFD(str(ours.path))
    reference.prepare(-1, det_thresh=0.5, nms_thresh=0.4)
    compared = 0
    for image in [group_photo, *lfw_images]:
        faces = ours.detect(image)
        boxes, kpss = reference.detect(image, input_size=ours.input_size_for(image))
        assert len(faces) == len(boxes)
        for face, box, kps in zip(faces, boxes, kpss, strict=True):
            assert box_iou(face.box, box[:4]) >= 0.95
            assert np.abs(face.landmarks - kps).max() <= 1.5
            assert abs(face.score - box[4]) < 1e-3
            compared += 1
    assert compared >= 100


def test_dynamic_scrfd_runs_at_image_size(shared_registry, group_photo):
    dynamic = detector(shared_registry, "scrfd_2.5g_bnkps")
    assert dynamic.fixed_size is None
    assert dynamic.input_size_for(np.zeros((250, 250, 3), np.uint8)) == (256, 256)
    assert dynamic.input_size_for(group_photo) == (640, 448)  # 1280x886 scaled to det_size 640
    fixed = detector(shared_registry, "scrfd_500m_bnkps_640")
    assert fixed.input_size_for(np.zeros((250, 250, 3), np.uint8)) == (640, 640)


def test_fixed_letterbox_on_a_dynamic_model(shared_registry, group_photo):
    card, path = shared_registry.resolve("scrfd_2.5g_bnkps")
    det = build_detector(card, path, Settings())
    det.use_fixed_input((640, 640))
    assert det.input_size_for(np.zeros((250, 250, 3), np.uint8)) == (640, 640)
    assert len(det.detect(group_photo)) == 6
    with pytest.raises(ValueError, match="multiples of 32"):
        det.use_fixed_input((250, 250))
    with pytest.raises(ValueError, match="only accepts"):
        detector(shared_registry, "yunet_2023mar").use_fixed_input((320, 320))


def test_yunet_matches_opencv_face_detector_yn(shared_registry, group_photo, lfw_images):
    ours = detector(shared_registry, "yunet_2023mar")
    reference = cv2.FaceDetectorYN.create(str(ours.path), "", (640, 640), 0.5, 0.4, 100)
    for image in [group_photo, *lfw_images[:20]]:
        canvas, _ = letterbox(image, (640, 640))
        faces = ours.detect(canvas)
        _, ref = reference.detect(canvas)
        ref = np.zeros((0, 15)) if ref is None else ref
        assert len(faces) == len(ref)
        for face in faces:
            # OpenCV boxes are (x, y, w, h) then 5 landmarks then score.
            ref_boxes = np.c_[ref[:, :2], ref[:, :2] + ref[:, 2:4]]
            j = int(np.argmax([box_iou(face.box, b) for b in ref_boxes]))
            assert box_iou(face.box, ref_boxes[j]) > 0.95
            assert np.abs(face.landmarks - ref[j, 4:14].reshape(5, 2)).max() < 1.5
            assert abs(face.score - ref[j, 14]) < 1e-3


def test_retinaface_preprocessing_is_right(shared_registry, lfw_images):
    """The card's BGR minus (104, 117, 123) beats RGB and ArcFace-style inputs on real faces."""
    good = detector(shared_registry, "retinaface_mnet025")
    found = sum(bool(good.detect(img)) for img in lfw_images[:30])
    assert found >= 29
    card = good.card.model_copy(deep=True)
    card.preprocessing.mean = (127.5, 127.5, 127.5)
    card.preprocessing.std = (128.0, 128.0, 128.0)
    wrong = type(good)(card, good.path, Settings())
    assert sum(bool(wrong.detect(img)) for img in lfw_images[:30]) < found // 2


def test_batch_equals_one_by_one(shared_registry, group_photo, lfw_images):
    for name in ("retinaface_mnet025", "scrfd_2.5g_bnkps"):
        det = detector(shared_registry, name)
        images = [group_photo, *lfw_images[:5]]
        batched = det.detect_batch(images)
        for image, faces in zip(images, batched, strict=True):
            single = det.detect(image)
            assert len(single) == len(faces)
            for a, b in zip(single, faces, strict=True):
                np.testing.assert_allclose(a.box, b.box, atol=1e-3)
                np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)


def test_settings_limit_the_results(shared_registry, group_photo):
    assert len(detector(shared_registry, "scrfd_2.5g_bnkps", max_faces=2).detect(group_photo)) == 2
    top = detector(shared_registry, "scrfd_2.5g_bnkps").detect(group_photo)
    limited = detector(shared_registry, "scrfd_2.5g_bnkps", max_faces=2).detect(group_photo)
    assert [f.score for f in limited] == [f.score for f in top[:2]]
    large_only = detector(shared_registry, "scrfd_2.5g_bnkps", min_face_size=400)
    assert large_only.detect(group_photo) == []
    strict = detector(shared_registry, "scrfd_2.5g_bnkps", det_threshold=0.99).detect(group_photo)
    assert len(strict) < 6 and all(f.score >= 0.99 for f in strict)


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown detector family"):
        detector_class("haar")


def test_mtcnn_default_detector(group_photo, default_models_dir):
    """The installed default MTCNN finds the six faces of the group photo (a raised hand
    scores below the faces: the six confident detections are the faces)."""
    from service.registry import Registry

    settings = Settings(models_dir=default_models_dir)
    registry = Registry(settings.manifest, [default_models_dir])
    card, path = registry.resolve("mtcnn", task="detection")
    faces = build_detector(card, path, settings).detect(group_photo)
    confident = [f for f in faces if f.score >= 0.95]
    assert len(confident) == 6
    for face in faces:
        assert_plausible_face(face, group_photo.shape)
    # the confident ones are the same six faces YuNet finds
    yunet_card, yunet_path = Registry(settings.manifest, [SHARED_MODELS]).resolve(
        "yunet_2023mar", task="detection"
    )
    reference = build_detector(yunet_card, yunet_path, settings).detect(group_photo)
    for face in confident:
        assert max(box_iou(face.box, r.box) for r in reference) > 0.5
