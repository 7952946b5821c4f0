"""Training data: aligned-crop ImageFolder, InsightFace RecordIO reader, P×K sampler, ``prepare``.

Every sample is an aligned 112×112 face as a float tensor (3, H, W), RGB,
normalised ``(x − 127.5) / 128`` — exactly the ``preprocessing`` written into
the exported model card (:data:`MEAN`, :data:`STD`), so the service feeds the
model what it was trained on.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import struct
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

#: the normalisation the training package uses and exports into every card
MEAN = 127.5
STD = 128.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def to_tensor(image_bgr: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    """(H, W, 3) uint8 BGR → (3, H, W) float32 RGB, ``(x − mean) / std`` (scalars or RGB triples:
    a backbone's :class:`training.contract.InputContract`)."""
    rgb = np.ascontiguousarray(image_bgr[..., ::-1], dtype=np.float32)
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return torch.from_numpy((rgb - mean) / std).permute(2, 0, 1).contiguous()


@dataclass
class Augment:
    """Training-time augmentation on uint8 BGR crops: horizontal flip (default) and optional
    extras."""

    flip: bool = True
    brightness: float = 0.0  # max relative change, 0 = off
    contrast: float = 0.0
    grayscale: float = 0.0  # probability of dropping colour (LFW evaluation images are grey)

    def __call__(self, image: np.ndarray, rng=random) -> np.ndarray:
        """``rng``: the ``random`` module (seeded per DataLoader worker) or a ``random.Random``."""
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        if self.grayscale and rng.random() < self.grayscale:
            grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2GRAY)
            image = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
        if self.brightness or self.contrast:
            alpha = 1.0 + rng.uniform(-self.contrast, self.contrast)
            beta = 255.0 * rng.uniform(-self.brightness, self.brightness)
            image = np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(image)


def resize(image: np.ndarray, size: int | None) -> np.ndarray:
    """Bilinear resize to ``size``×``size`` — the same ``cv2.resize`` the service's embedder applies
    when a card's ``input_size`` differs from its alignment size."""
    if size is None or image.shape[:2] == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


class FaceImageFolder(Dataset):
    """``root/<identity>/<image>`` of aligned crops; identities sorted by name → labels 0..C−1.

    ``identities`` restricts (and orders) the classes used, e.g. a subset for tests;
    ``size`` resizes crops for a backbone whose input is smaller than the crop.
    """

    def __init__(
        self,
        root: Path | str,
        augment: Augment | None = None,
        identities: Sequence[str] | None = None,
        min_images: int = 1,
        size: int | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset directory not found: {self.root}")
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if identities is not None:
            missing = set(identities) - set(names)
            if missing:
                raise ValueError(f"identities not in {self.root}: {sorted(missing)[:5]}")
            names = list(identities)
        self.samples: list[tuple[Path, int]] = []
        self.classes: list[str] = []
        for name in names:
            files = sorted(
                f for f in (self.root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
            )
            if len(files) < min_images:
                continue
            label = len(self.classes)
            self.classes.append(name)
            self.samples.extend((f, label) for f in files)
        if not self.samples:
            raise ValueError(f"no images under {self.root}")
        self.augment = augment
        self.size = size
        # the backbone's contract (set by the training loop): scalars or RGB triples
        self.mean: float | tuple[float, float, float] = MEAN
        self.std: float | tuple[float, float, float] = STD

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> np.ndarray:
        path = self.samples[index][0]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"unreadable image {path}")
        return resize(image, self.size)

    def __getitem__(self, index: int):
        image = self.read(index)
        if self.augment is not None:
            image = self.augment(image)
        return to_tensor(image, self.mean, self.std), self.samples[index][1]


class RecordIODataset(Dataset):
    """InsightFace ``train.rec`` + ``train.idx`` (MS1MV2, Glint360K, WebFace) without mxnet.

    Format (MXNet/dmlc ``recordio``): each record is ``uint32 magic 0xced7230a``,
    ``uint32 lrecord`` (upper 3 bits continuation flag, lower 29 bits length),
    the payload padded to 4 bytes.  A payload holding the magic number at a
    4-byte-aligned position is split there into parts flagged 1 (first),
    2 (middle), 3 (last); the reader joins them, putting the magic back.  The
    payload is an ``IRHeader`` (``uint32 flag, float32 label, uint64 id,
    uint64 id2``) followed by, when ``flag > 0``, ``flag`` float32 labels, then
    the JPEG bytes.  Record 0 is a header whose label ``(a, b)`` gives the image
    index range [1, a).  ``train.idx`` lines are ``<key>\t<byte offset>``.

    The file is opened lazily, once per process (DataLoader workers forked on
    Linux must not share the parent's handle: they would share its position);
    :attr:`labels` reads only the records' headers.
    """

    MAGIC = 0xCED7230A
    MAGIC_BYTES = struct.pack("<I", MAGIC)
    HEADER = struct.Struct("<IfQQ")
    LENGTH_MASK = (1 << 29) - 1

    def __init__(self, root: Path | str, augment: Augment | None = None, size: int | None = None):
        self.root = Path(root)
        self.size = size
        self.rec_path, idx_path = self.root / "train.rec", self.root / "train.idx"
        if not self.rec_path.is_file() or not idx_path.is_file():
            raise FileNotFoundError(f"{self.root} needs train.rec and train.idx")
        self.offsets: dict[int, int] = {}
        for line in idx_path.read_text().splitlines():
            if line.strip():
                key, offset = line.split("\t")
                self.offsets[int(key)] = int(offset)
        self._fh: io.FileIO | None = None
        self._pid: int | None = None
        flag, labels = self._read_labels(0)
        if flag > 0:  # header record: images are keys 1 .. label[0]-1
            self.keys = list(range(1, int(labels[0])))
        else:
            self.keys = sorted(k for k in self.offsets)
        missing = [k for k in self.keys if k not in self.offsets]
        if missing:
            raise ValueError(
                f"{self.rec_path}: {len(missing)} records missing from train.idx "
                f"(first: key {missing[0]})"
            )
        self.augment = augment
        # the backbone's contract (set by the training loop): scalars or RGB triples
        self.mean: float | tuple[float, float, float] = MEAN
        self.std: float | tuple[float, float, float] = STD
        self._labels: list[int] | None = None

    def __getstate__(self):  # file handles do not cross DataLoader worker processes
        state = dict(self.__dict__)
        state["_fh"], state["_pid"] = None, None
        return state

    def _file(self) -> io.FileIO:
        if self._fh is None or self._pid != os.getpid():
            # one unbuffered handle per process, kept open for the dataset's lifetime
            self._fh = open(self.rec_path, "rb", buffering=0)  # noqa: SIM115
            self._pid = os.getpid()
        return self._fh

    def _payload(self, key: int, need: int | None = None) -> bytes:
        """Record ``key``'s payload, its parts joined; only its first ``need`` bytes if given."""
        fh = self._file()
        fh.seek(self.offsets[key])
        chunks: list[bytes] = []
        size = 0
        while True:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.rec_path}: record {key} is truncated")
            magic, lrecord = struct.unpack("<II", head)
            if magic != self.MAGIC:
                raise ValueError(f"{self.rec_path}: bad record magic at key {key}")
            cflag, length = lrecord >> 29, lrecord & self.LENGTH_MASK
            if cflag not in ((0, 1) if not chunks else (2, 3)):
                raise ValueError(
                    f"{self.rec_path}: record {key} has a part with continuation "
                    f"flag {cflag} out of sequence (train.idx must point at the "
                    "first part of each record)"
                )
            take = length if need is None else min(length, need - size)
            data = fh.read(take)
            if len(data) < take:
                raise ValueError(f"{self.rec_path}: record {key} is truncated")
            chunks.append(data)
            size += take
            if cflag in (0, 3) or (need is not None and size >= need):
                return b"".join(chunks)
            fh.seek(length - take + (-length % 4), os.SEEK_CUR)  # middle parts: aligned
            chunks.append(self.MAGIC_BYTES)
            size += 4

    def _parse_header(self, key: int, payload: bytes) -> tuple[int, list[float], int]:
        """(flag, labels, size of the header) of a payload's first bytes."""
        if len(payload) < self.HEADER.size:
            raise ValueError(f"{self.rec_path}: record {key} is shorter than its header")
        flag, label = self.HEADER.unpack_from(payload)[:2]
        if flag == 0:
            return flag, [label], self.HEADER.size
        end = self.HEADER.size + 4 * flag
        if len(payload) < end:
            raise ValueError(f"{self.rec_path}: record {key} is shorter than its {flag} labels")
        return flag, list(np.frombuffer(payload[self.HEADER.size : end], np.float32)), end

    def _read_labels(self, key: int) -> tuple[int, list[float]]:
        """A record's header only, not its image."""
        payload = self._payload(key, self.HEADER.size)
        flag = self.HEADER.unpack_from(payload)[0] if len(payload) >= self.HEADER.size else 0
        if flag > 0:
            payload = self._payload(key, self.HEADER.size + 4 * flag)
        return self._parse_header(key, payload)[:2]

    def _read_record(self, key: int) -> tuple[list[float], bytes]:
        payload = self._payload(key)
        _, labels, end = self._parse_header(key, payload)
        return labels, payload[end:]

    @property
    def labels(self) -> list[int]:
        if self._labels is None:
            self._labels = [int(self._read_labels(k)[1][0]) for k in self.keys]
        return self._labels

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        labels, body = self._read_record(self.keys[index])
        image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{self.rec_path}: record {self.keys[index]} is not an image")
        image = resize(image, self.size)
        if self.augment is not None:
            image = self.augment(image)
        return to_tensor(image, self.mean, self.std), int(labels[0])


def _write_record(rec, payload: bytes) -> None:
    """One dmlc record: split at every 4-byte-aligned magic number (as dmlc's writer does)."""
    magic = RecordIODataset.MAGIC_BYTES
    start = 0
    for i in range(0, len(payload) - 3, 4):
        if payload[i : i + 4] == magic:
            rec.write(
                struct.pack(
                    "<II", RecordIODataset.MAGIC, ((1 if start == 0 else 2) << 29) | (i - start)
                )
            )
            rec.write(payload[start:i])
            start = i + 4
    rec.write(
        struct.pack(
            "<II", RecordIODataset.MAGIC, ((3 if start else 0) << 29) | (len(payload) - start)
        )
    )
    rec.write(payload[start:] + b"\0" * (-len(payload) % 4))


def write_recordio(root: Path | str, items: Sequence[tuple[bytes, int]]) -> None:
    """Write ``(jpeg_bytes, label)`` items as an InsightFace-style ``train.rec``/``train.idx``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    header = RecordIODataset.HEADER
    records = [header.pack(2, 0.0, 0, 0) + struct.pack("<ff", len(items) + 1, len(items) + 1)]
    records += [
        header.pack(0, float(label), i + 1, 0) + data for i, (data, label) in enumerate(items)
    ]
    with open(root / "train.rec", "wb") as rec, open(root / "train.idx", "w") as idx:
        for key, payload in enumerate(records):
            if len(payload) > RecordIODataset.LENGTH_MASK:
                raise ValueError(f"record {key} is {len(payload)} bytes, over RecordIO's 2^29 - 1")
            idx.write(f"{key}\t{rec.tell()}\n")
            _write_record(rec, payload)


class PKSampler(Sampler[int]):
    """Batches of P identities × K images each (for triplet and marginal losses).

    Yields indices; consecutive ``P·K`` indices form one batch.  Identities with
    fewer than K images are sampled with replacement.  Deterministic per epoch.
    """

    def __init__(
        self,
        labels: Sequence[int],
        p: int,
        k: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if k < 2:
            raise ValueError("K must be at least 2 images per identity")
        self.by_label: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            self.by_label[int(label)].append(index)
        if len(self.by_label) < p:
            raise ValueError(f"P={p} identities per batch, but the data has {len(self.by_label)}")
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        self.rank, self.world_size = rank, world_size
        self.batches = max(1, len(labels) // (p * k * world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches * self.p * self.k

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        identities = sorted(self.by_label)
        out: list[list[int]] = []
        for _ in range(self.batches * self.world_size):
            chosen = rng.sample(identities, self.p)
            batch: list[int] = []
            for ident in chosen:
                pool = self.by_label[ident]
                if len(pool) >= self.k:
                    picks = rng.sample(pool, self.k)
                else:
                    picks = rng.choices(pool, k=self.k)
                batch.extend(picks)
            out.append(batch)
        for batch in out[self.rank :: self.world_size]:
            yield from batch


class ResumableSampler(Sampler[int]):
    """``sampler`` (with ``set_epoch``) that leaves out its first ``skip`` indices, for the epoch
    a stopped run resumes in; ``skip`` is set per epoch by the training loop."""

    def __init__(self, sampler: PKSampler | DistributedSampler) -> None:
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)


def write_dataset_info(root: Path, info: dict) -> None:
    (Path(root) / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def read_dataset_info(root: Path | str) -> dict:
    path = Path(root) / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {}
