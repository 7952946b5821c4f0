"""``facegate gallery import DIR --gallery G`` on both store backends, with real LFW photos.

The directory holds four LFW people (two photos each, one of them twice under another
name), a photo of two people side by side, a shrunk photo, a file that is no image and a
text file.  The import enrols the good photos, refuses the others with their codes, skips
the duplicate, and a second run (an interrupted import run again) enrols nothing new.  A
replica following the store applies the imported faces from the change log, and other
photos of the people are identified as them.  The enrolment quality rules, when set,
refuse faces with their own codes.
"""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from service.cli import main as cli_main
from service.config import Settings
from service.gallery import open_gallery
from service.pipeline.pipeline import Pipeline
from tests.conftest import LFW, SHARED_MODELS

DETECTOR = "yunet_2023mar"
RECOGNIZER = "mobilefacenet_peer_128d"
PEOPLE = ["Abdoulaye_Wade", "Angela_Merkel", "Arianna_Huffington", "Alan_Greenspan"]


def photo_path(name: str, number: int):
    return sorted((LFW / "images" / name).glob("*.jpg"))[number - 1]


def model_settings(**overrides) -> Settings:
    return Settings(
        models_dir=SHARED_MODELS,
        detector=DETECTOR,
        recognizer=RECOGNIZER,
        providers=["CPUExecutionProvider"],
        faiss_gpu=False,
        **overrides,
    )


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_settings(model_settings())


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for name in PEOPLE:
        (root / name).mkdir(parents=True)
        for number in (1, 2):
            shutil.copy(photo_path(name, number), root / name / f"{number}.jpg")
    shutil.copy(photo_path("Angela_Merkel", 1), root / "Angela_Merkel" / "copy.JPG")
    odd = root / "Odd_Ones"
    odd.mkdir()
    left = cv2.imread(str(photo_path(PEOPLE[0], 1)))
    right = cv2.imread(str(photo_path(PEOPLE[2], 1)))
    cv2.imwrite(str(odd / "two_people.png"), np.hstack([left, right]))
    small = cv2.resize(left, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(odd / "small.jpg"), small)
    (odd / "broken.webp").write_bytes(b"this is not an image")
    (odd / "notes.txt").write_text("not a photo: ignored")
    return root


def run_import(capsys, root, store_url, *extra: str) -> tuple[int, dict, str]:
    code = cli_main(
        [
            "gallery",
            "import",
            str(root),
            "--gallery",
            "staff",
            "--store-url",
            store_url,
            "--models-dir",
            str(SHARED_MODELS),
            "--detector",
            DETECTOR,
            "--recognizer",
            RECOGNIZER,
            "--batch",
            "3",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured


def embed_one(pipeline: Pipeline, path) -> np.ndarray:
    image = pipeline.decode(path.read_bytes())
    return pipeline.embed(pipeline.align(image, pipeline.detect(image)[:1]))[0]


@pytest.mark.timeout(300)
def test_import_directory(tmp_path, store_url, photos, pipeline, capsys):
    follower = open_gallery(
        model_settings(data_dir=tmp_path / "follower", store_url=store_url, sync_interval_s=0.05)
    )
    follower.start()
    try:
        code, summary, captured = run_import(capsys, photos, store_url)
        assert code == 0, captured.err
        assert summary["photos"] == 2 * len(PEOPLE) + 1 + 3
        assert summary["enrolled"] == 2 * len(PEOPLE)
        assert summary["already_enrolled"] == 1  # copy.JPG is photo 1 again
        assert summary["subjects"] == len(PEOPLE)
        refused = {r["path"].rsplit("/", 1)[-1]: r["code"] for r in summary["refusals"]}
        assert refused == {
            "two_people.png": "multiple_faces",
            "small.jpg": "face_too_small",
            "broken.webp": "unsupported_image_type",
        }
        assert summary["faces_per_s"] > 0
        assert "photo/s" in captured.err or "s/photo" in captured.err  # the progress bar
        assert f"refused {photos / 'Odd_Ones' / 'small.jpg'}: face_too_small" in captured.out

        follower.catch_up()
        stored = follower.store.face_ids("staff")
        assert len(stored) == 2 * len(PEOPLE)
        assert np.array_equal(follower.index_face_ids("staff"), stored)
        model_id = pipeline.embedder.model_id
        for name in PEOPLE:
            probe = embed_one(pipeline, photo_path(name, 3))
            best = follower.search("staff", probe[None, :], 1, model_id)[0][0]
            assert best["subject_id"] == name
        assert "Odd_Ones" not in {s["subject_id"] for s in follower.list_subjects("staff")[0]}

        # run again (as after an interruption): nothing is enrolled twice
        code, again, _ = run_import(capsys, photos, store_url, "--no-progress")
        assert code == 0
        assert again["enrolled"] == 0 and again["already_enrolled"] == 2 * len(PEOPLE) + 1
        assert again["refused"] == 3
        assert len(follower.store.face_ids("staff")) == 2 * len(PEOPLE)
    finally:
        follower.stop()


@pytest.mark.timeout(300)
def test_import_enforces_quality_rules(tmp_path, store_url, photos, pipeline, capsys, monkeypatch):
    shutil.rmtree(photos / "Odd_Ones")
    # Each rule refuses every photo when its limit is past every face's figure
    # (off by default, as the first test shows).
    rules = [
        ("FACEGATE_ENROLL_MIN_SHARPNESS", "1e9", "blurred_face"),
        ("FACEGATE_ENROLL_MAX_YAW_RATIO", "1e-9", "face_turned"),
        ("FACEGATE_ENROLL_MAX_ROLL_DEG", "1e-9", "face_tilted"),
    ]
    for variable, value, code_expected in rules:
        monkeypatch.setenv(variable, value)
        code, summary, _ = run_import(capsys, photos, store_url, "--no-progress")
        monkeypatch.delenv(variable)
        assert code == 0
        assert summary["enrolled"] == 0
        assert {r["code"] for r in summary["refusals"]} == {code_expected}
        assert summary["refused"] == 2 * len(PEOPLE) + 1
