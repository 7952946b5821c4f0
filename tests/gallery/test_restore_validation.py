"""Restore refuses every file the REST API could not have written, and writes nothing.

Export files are built here by hand from the format's description
(:mod:`service.gallery.transfer`: gzip JSON lines, an end record with the counts and the
sha256 of the preceding lines), from a real LFW photo and random unit embeddings; a
well-formed one restores (so the builder is right), and each hostile variant found in
review is answered ``invalid_export`` by ``facegate gallery restore`` (exit 3) with the
store unchanged, never a traceback or a gallery that answers 500 afterwards.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import time

import numpy as np
import pytest

from service.cli import main as cli_main
from service.config import Settings
from service.gallery import open_gallery
from service.gallery.errors import InvalidExport
from service.gallery.transfer import read_export, restore
from tests.conftest import SHARED_MODELS, photo

DIM = 8
MODEL = "test-model"
PHOTO = photo("Angela_Merkel", 1)
PHOTO_SHA = hashlib.sha256(PHOTO).hexdigest()
KIND = re.compile(rb'"type": ?"(\w+)"')


def vector(seed: int) -> str:
    v = np.random.default_rng(seed).standard_normal(DIM).astype("<f4")
    return base64.b64encode((v / np.linalg.norm(v)).astype("<f4").tobytes()).decode()


def records() -> list[dict]:
    now = time.time()
    return [
        {
            "type": "header",
            "format": "facegate-gallery",
            "version": 1,
            "gallery": "g",
            "model_id": MODEL,
            "model_sha256": None,
            "dim": DIM,
            "created_at": now,
            "exported_at": now,
        },
        {"type": "subject", "subject_id": "s1", "metadata": {"k": 1}, "created_at": now},
        {"type": "subject", "subject_id": "s2", "metadata": {}, "created_at": now},
        {
            "type": "face",
            "face_id": 1,
            "subject_id": "s1",
            "embedding": vector(1),
            "quality": {"det_score": 0.9},
            "created_at": now,
            "content_sha256": PHOTO_SHA,
            "image": base64.b64encode(PHOTO).decode(),
        },
        {
            "type": "face",
            "face_id": 2,
            "subject_id": "s2",
            "embedding": vector(2),
            "quality": {},
            "created_at": now,
            "content_sha256": None,
            "image": None,
        },
    ]


def pack(body: list[dict | bytes]) -> bytes:
    """An export file of ``body`` (records, or raw lines) with a correct end record."""
    lines = [
        item if isinstance(item, bytes) else json.dumps(item).encode() + b"\n" for item in body
    ]
    kinds = [KIND.search(line)[1].decode() for line in lines]  # type: ignore[index]
    end = {
        "type": "end",
        "subjects": kinds.count("subject"),
        "faces": kinds.count("face"),
        "sha256": hashlib.sha256(b"".join(lines)).hexdigest(),
    }
    return gzip.compress(b"".join(lines) + json.dumps(end).encode() + b"\n")


def deep(levels: int) -> bytes:
    """A subject line whose metadata is nested ``levels`` deep (as text: no recursion)."""
    metadata = '{"a":' * levels + "1" + "}" * levels
    return (
        f'{{"type":"subject","subject_id":"deep","metadata":{metadata},"created_at":1}}\n'
    ).encode()


def variant(name: str) -> bytes:
    body: list[dict | bytes] = list(records())
    subject, face = body[1], body[3]
    assert isinstance(subject, dict) and isinstance(face, dict)
    if name == "created_at_infinity":
        subject["created_at"] = float("inf")  # json writes Infinity
    elif name == "created_at_1e300":
        face["created_at"] = 1e300
    elif name == "created_at_nan":
        subject["created_at"] = float("nan")
    elif name == "created_at_far_future":
        subject["created_at"] = time.time() + 10 * 365 * 86400
    elif name == "header_created_at_1e300":
        body[0]["created_at"] = 1e300  # type: ignore[index]
    elif name == "metadata_5000_deep":
        body.insert(3, deep(5000))
    elif name == "metadata_17_deep":  # the REST limit is 16
        body.insert(3, deep(17))
    elif name == "metadata_too_large":
        subject["metadata"] = {"k": "x" * 70_000}
    elif name == "quality_too_deep":
        face["quality"] = json.loads('{"a":' * 20 + "1" + "}" * 20)
    elif name == "duplicate_face_record":
        body.insert(4, dict(face))
    elif name == "shared_content_sha256":
        second = body[4]
        assert isinstance(second, dict)
        second["content_sha256"] = PHOTO_SHA
    elif name == "image_not_its_sha256":
        face["image"] = base64.b64encode(PHOTO[:-1] + b"\0").decode()
    elif name == "huge_integer_time":
        line = b'{"type":"subject","subject_id":"x","metadata":{},"created_at":1'
        body.insert(3, line + b"0" * 5000 + b"}\n")
    return pack(body)


HOSTILE = [
    "created_at_infinity",
    "created_at_1e300",
    "created_at_nan",
    "created_at_far_future",
    "header_created_at_1e300",
    "metadata_5000_deep",
    "metadata_17_deep",
    "metadata_too_large",
    "quality_too_deep",
    "duplicate_face_record",
    "shared_content_sha256",
    "image_not_its_sha256",
    "huge_integer_time",
]


@pytest.fixture
def gallery(tmp_path):
    service = open_gallery(Settings(data_dir=tmp_path / "g", faiss_gpu=False, store_images=True))
    service.start()
    yield service
    service.stop()


def test_a_well_formed_file_restores(gallery):
    export = read_export(io.BytesIO(pack(records())))
    report = restore(gallery, export, MODEL, None)
    assert (report["subjects"], report["faces"], report["photos"]) == (2, 2, 1)
    assert gallery.get_subject("g", "s1")["metadata"] == {"k": 1}
    assert gallery.list_subjects("g", 10, None)[0][0]["subject_id"] == "s1"


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_file_is_invalid_export(gallery, name):
    with pytest.raises(InvalidExport):
        read_export(io.BytesIO(variant(name)))


def test_restore_command_writes_nothing_for_a_hostile_file(tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'gallery.sqlite3'}"
    for name in ("created_at_infinity", "metadata_5000_deep", "duplicate_face_record"):
        path = tmp_path / f"{name}.jsonl.gz"
        path.write_bytes(variant(name))
        code = cli_main(
            [
                *("gallery", "restore", str(path), "--store-url", store),
                *("--models-dir", str(SHARED_MODELS), "--recognizer", "mobilefacenet_peer_128d"),
            ]
        )
        answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 3 and answer["error"]["code"] == "invalid_export", (name, answer)
    service = open_gallery(Settings(store_url=store, data_dir=tmp_path, faiss_gpu=False))
    service.start()
    try:
        assert service.list_galleries() == []
    finally:
        service.stop()


def test_a_line_longer_than_a_photo_needs_is_refused_before_it_is_held():
    # one line of 3 MB of base64 'A' against a 1 MiB image limit: refused at the bound
    line = b'{"type":"subject","subject_id":"x","metadata":{"pad":"' + b"A" * 3_000_000 + b'"}}\n'
    data = pack([records()[0], line])
    with pytest.raises(InvalidExport, match="longer than"):
        read_export(io.BytesIO(data), max_image_bytes=1024 * 1024)
