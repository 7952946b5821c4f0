"""Read PyTorch ``.pt`` state-dict files into numpy arrays without importing torch.

Two on-disk formats exist:

* the **zip** format (``torch.save`` since 1.6): an archive holding ``<root>/data.pkl``
  and one raw little-endian blob per storage at ``<root>/data/<key>``;
* the **legacy** format: a stream of pickles (magic number, protocol version,
  system info, the object itself, the list of storage keys) followed by each
  storage as an int64 element count and its raw bytes.

Both pickles are read with a :class:`pickle.Unpickler` whose ``find_class``
resolves only a short allow-list (``OrderedDict``, the tensor/parameter rebuild
functions and the typed storage classes) to local, inert stand-ins. Any other
global raises :class:`UnsafePickleError`, so reading a file never imports or
executes anything it names.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class TorchPickleError(ValueError):
    """The file is not a readable PyTorch state dict."""


class UnsafePickleError(TorchPickleError):
    """The pickle references a global outside the allow-list."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.<X>Storage``: only carries the element dtype."""

    name: str
    dtype: np.dtype


@dataclass
class _Storage:
    """A storage referenced by a persistent id; ``data`` is filled once its bytes are read."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    """A tensor view (offset, size, stride) into a storage, materialised after loading."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise TorchPickleError(f"storage {self.storage.key!r} has no data")
        if not self.size:
            return np.array(data[self.offset], dtype=data.dtype)
        extent = (
            self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True)) + 1
        )
        if min(self.size) > 0 and (
            extent > data.size or self.offset < 0 or any(s < 0 for s in self.stride)
        ):
            raise TorchPickleError(f"tensor view exceeds storage {self.storage.key!r}")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.size,
            strides=tuple(s * data.itemsize for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise TorchPickleError("tensor rebuild without a storage")
    return _TensorRef(
        storage, int(storage_offset), tuple(int(v) for v in size), tuple(int(v) for v in stride)
    )


def _rebuild_parameter(data, *_ignored):
    return data


_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that maps allow-listed globals to stand-ins and refuses everything else."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage] | None = None):
        super().__init__(file)
        self.storages = storages if storages is not None else {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: only PyTorch tensor rebuild "
                "functions, storage types and OrderedDict are allowed"
            ) from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise TorchPickleError(f"unsupported persistent id {pid!r}")
        # zip: (tag, type, key, location, numel); legacy adds view metadata.
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) > 5 and pid[5] is not None:
            raise TorchPickleError("storage views are not supported")
        if not isinstance(storage_type, _StorageType):
            raise TorchPickleError(f"unsupported storage type {storage_type!r}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type.dtype, int(numel))
        return self.storages[key]


def _flatten(obj, prefix: str = "") -> dict[str, np.ndarray]:
    """Turn the (possibly nested) dict of tensor refs into ``{dotted.name: array}``."""
    if isinstance(obj, _TensorRef):
        return {prefix: obj.to_numpy()}
    if isinstance(obj, dict):
        out: dict[str, np.ndarray] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}


def _load_zip(archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise TorchPickleError("zip archive has no single data.pkl")
    root = pkl[0][: -len("data.pkl")]
    unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pkl[0])))
    obj = unpickler.load()
    for key, storage in unpickler.storages.items():
        raw = archive.read(f"{root}data/{key}")
        if len(raw) < storage.numel * storage.dtype.itemsize:
            raise TorchPickleError(f"storage {key!r} is truncated")
        storage.data = np.frombuffer(raw, dtype=storage.dtype, count=storage.numel)
    return _flatten(obj)


def _load_legacy(fh: BinaryIO) -> dict[str, np.ndarray]:
    def header() -> object:
        return _RestrictedUnpickler(fh).load()

    if header() != LEGACY_MAGIC:
        raise TorchPickleError("not a PyTorch file (bad magic number)")
    if header() != LEGACY_PROTOCOL:
        raise TorchPickleError("unsupported legacy PyTorch protocol version")
    sys_info = header()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise TorchPickleError("big-endian PyTorch files are not supported")
    unpickler = _RestrictedUnpickler(fh)
    obj = unpickler.load()
    keys = _RestrictedUnpickler(fh).load()
    if not isinstance(keys, list):
        raise TorchPickleError("malformed storage key list")
    for key in keys:
        storage = unpickler.storages.get(str(key))
        if storage is None:
            raise TorchPickleError(f"unknown storage key {key!r}")
        (count,) = struct.unpack("<q", fh.read(8))
        nbytes = count * storage.dtype.itemsize
        raw = fh.read(nbytes)
        if count < storage.numel or len(raw) != nbytes:
            raise TorchPickleError(f"storage {key!r} is truncated")
        storage.data = np.frombuffer(raw, dtype=storage.dtype, count=count)
    return _flatten(obj)


def load_state_dict(source: bytes | str | Path) -> dict[str, np.ndarray]:
    """Read a ``.pt`` state dict (bytes or a path) as ``{parameter name: numpy array}``.

    Raises :class:`UnsafePickleError` for pickles naming non-allow-listed globals and
    :class:`TorchPickleError` for anything else it cannot read.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return _load_zip(archive)
        return _load_legacy(io.BytesIO(data))
    except TorchPickleError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        struct.error,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        zipfile.BadZipFile,
    ) as exc:
        raise TorchPickleError(f"cannot read PyTorch state dict: {exc}") from exc
