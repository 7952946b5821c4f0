"""The RecordIO reader under forked DataLoader workers, split (multi-part) records, header-only
labels."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.training.test_training_loop import celeba_tiny  # noqa: F401
from training.data import FaceImageFolder, RecordIODataset, write_recordio

MAGIC = RecordIODataset.MAGIC_BYTES
SPLIT = 5  # the item whose payload holds the magic number twice (a 3-part record)


def _items(folder: Path) -> list[tuple[bytes, int]]:
    """The CelebA crops as JPEG records; item SPLIT carries two aligned magic numbers after
    its JPEG end marker (decoders stop at the marker), which the writer must split at."""
    items = []
    for path, label in FaceImageFolder(folder).samples:
        items.append((cv2.imencode(".jpg", cv2.imread(str(path)))[1].tobytes(), label))
    data, label = items[SPLIT]
    pad = b"\0" * (-(RecordIODataset.HEADER.size + len(data)) % 4)
    items[SPLIT] = (data + pad + MAGIC + MAGIC + b"end", label)
    return items


def _decoded(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return ((image[..., ::-1].astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.fixture
def recordio(celeba_tiny, tmp_path):  # noqa: F811
    items = _items(celeba_tiny)
    write_recordio(tmp_path / "rec", items)
    return tmp_path / "rec", items


def _offsets(root: Path) -> dict[int, int]:
    lines = (root / "train.idx").read_text().split()
    return {int(k): int(v) for k, v in zip(lines[::2], lines[1::2], strict=True)}


@pytest.mark.timeout(120)
def test_two_forked_workers_read_exactly_what_one_process_reads(recordio):
    root, items = recordio
    single = RecordIODataset(root)
    expected = [single[i] for i in range(len(single))]
    assert [label for _, label in expected] == [label for _, label in items]
    # the split record joined again
    for (tensor, _), (data, _) in zip(expected, items, strict=True):
        np.testing.assert_array_equal(tensor.numpy(), _decoded(data))

    # the dataset has already opened its file in this process: the workers must not share it
    shared = RecordIODataset(root)
    assert shared.labels and shared[0][1] == items[0][1]
    loader = torch.utils.data.DataLoader(
        shared, batch_size=1, num_workers=2, multiprocessing_context="fork"
    )
    for _ in range(3):
        got = [(images[0], int(labels[0])) for images, labels in loader]
        assert len(got) == len(expected)
        for (a, la), (b, lb) in zip(got, expected, strict=True):
            assert la == lb
            assert torch.equal(a, b)


def test_the_writer_splits_at_aligned_magic_and_the_reader_checks_the_parts(recordio):
    root, _ = recordio
    offsets = _offsets(root)
    raw = (root / "train.rec").read_bytes()
    key = SPLIT + 1
    magic, lrecord = struct.unpack_from("<II", raw, offsets[key])
    assert magic == RecordIODataset.MAGIC and lrecord >> 29 == 1  # the first of several parts
    second = offsets[key] + 8 + (lrecord & RecordIODataset.LENGTH_MASK)
    assert struct.unpack_from("<II", raw, second)[1] >> 29 == 2  # empty middle part
    others = [struct.unpack_from("<II", raw, offsets[k])[1] >> 29 for k in offsets if k != key]
    assert set(others) == {0}

    # an index that points into a record (at its middle part) is a clear error
    offsets[key] = second
    (root / "train.idx").write_text("".join(f"{k}\t{v}\n" for k, v in offsets.items()))
    dataset = RecordIODataset(root)
    with pytest.raises(ValueError, match="continuation flag 2"):
        dataset[SPLIT]


def test_labels_read_only_the_record_headers(recordio):
    root, items = recordio
    dataset = RecordIODataset(root)
    payload_bytes = sum(len(data) for data, _ in items)
    before = _rchar()
    itself = _rchar() - before  # what reading /proc/self/io counts
    before = _rchar()
    labels = dataset.labels
    read = _rchar() - before - itself
    assert labels == [label for _, label in items]
    assert dataset.num_classes == max(labels) + 1
    # magic + length + IRHeader per record, not the JPEGs
    assert read <= len(items) * (8 + RecordIODataset.HEADER.size) + 16
    assert read < payload_bytes / 20
