"""Read (and, for tests and tools, write) MXNet `.params` files without MXNet.

The ImageNet ResNet-38d weights (`resnet_38d.params`, itijyou/ademxapp) exist only in this format, and
MXNet itself is retired and hard to install, so the few bytes of layout it needs are read here.

File: uint64 magic 0x112, uint64 reserved, uint64 count + that many NDArrays, uint64 count + names
(each uint64 length + UTF-8 bytes; zero names is allowed). All little-endian.
NDArray, three generations, told apart by their first uint32:
- legacy (no magic; the uint32 is the ndim): uint32 dims, context, type flag, data;
- V1 (0xF993FAC8): shape (int32 ndim + int64 dims), context, type flag, data;
- V2 (0xF993FAC9): int32 storage type, [storage shape if sparse], shape, context, type flag,
  [sparse aux types and shapes], data; V3 (0xF993FACA) is V2 with numpy shape semantics
  (ndim 0 is a scalar, -1 unknown).
Context = int32 device type + int32 device id; type flag = mshadow's (0 float32, 1 float64, 2 float16,
3 uint8, 4 int32, 5 int8, 6 int64, 7 bool, 8 int16, 9 uint16, 10 uint32, 11 uint64).
Only dense storage is supported; a shape of ndim 0 (V3: -1) marks an empty "none" array, rejected here.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cse_ray.artifacts import atomic_open
from cse_ray.errors import UserError

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
LAYOUTS = ("legacy", "v1", "v2", "v3")

TYPE_FLAGS: dict[int, np.dtype] = {
    flag: np.dtype(name).newbyteorder("<")
    for flag, name in enumerate(
        ["float32", "float64", "float16", "uint8", "int32", "int8", "int64", "bool",
         "int16", "uint16", "uint32", "uint64"]
    )
}
_FLAG_OF_DTYPE = {dtype.newbyteorder("="): flag for flag, dtype in TYPE_FLAGS.items()}
_STORAGE_NAMES = {0: "default", 1: "row_sparse", 2: "csr"}
_CPU_CONTEXT = (1, 0)  # (device type kCPU, device id)
_MAX_NDIM = 32  # far above any real tensor; catches garbage read as a legacy header
_MAX_NAME_BYTES = 1 << 16


def is_mxnet_params(path: str | Path) -> bool:
    """True when the file starts with MXNet's NDArray-list magic (the extension is not trusted)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    return len(head) == 8 and struct.unpack("<Q", head)[0] == LIST_MAGIC


class _Reader:
    """Little-endian reads that fail with a UserError naming the file and what was being read."""

    def __init__(self, handle: BinaryIO, path: str) -> None:
        self.handle = handle
        self.path = path

    def exact(self, size: int, what: str) -> bytes:
        data = self.handle.read(size)
        if len(data) != size:
            raise UserError(f"{self.path}: file ends early while reading {what} (not a complete MXNet file)")
        return data

    def scalar(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.exact(struct.calcsize(fmt), what))[0]

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        out = np.empty(count, dtype=dtype)
        view = memoryview(out).cast("B")
        if count and self.handle.readinto(view) != view.nbytes:
            raise UserError(f"{self.path}: file ends early while reading {what} (not a complete MXNet file)")
        return out

    def shape64(self, what: str) -> tuple[int, ...] | None:
        """mxnet::TShape: int32 ndim, int64 dims. None for an unknown (-1) ndim."""
        ndim = self.scalar("i", what)
        if ndim < 0:
            return None
        if ndim > _MAX_NDIM:
            raise UserError(f"{self.path}: {what} has ndim {ndim}; not an MXNet NDArray")
        return tuple(int(d) for d in struct.unpack(f"<{ndim}q", self.exact(8 * ndim, what)))


def _read_ndarray(reader: _Reader, index: int) -> np.ndarray:
    what = f"NDArray #{index}"
    magic = reader.scalar("I", what)
    if magic in (V2_MAGIC, V3_MAGIC):
        storage = reader.scalar("i", what)
        if storage != 0:
            kind = _STORAGE_NAMES.get(storage, f"type {storage}")
            raise UserError(f"{reader.path}: {what} uses {kind} storage; only dense NDArrays are supported")
        shape = reader.shape64(what)
        is_none = shape is None or (magic == V2_MAGIC and len(shape) == 0)
    elif magic == V1_MAGIC:
        shape = reader.shape64(what)
        is_none = not shape
    else:  # legacy: the first word was the ndim of a uint32 shape
        if magic > _MAX_NDIM:
            raise UserError(f"{reader.path}: {what} starts with unknown header 0x{magic:08x}")
        shape = tuple(struct.unpack(f"<{magic}I", reader.exact(4 * magic, what)))
        is_none = magic == 0
    if is_none:
        raise UserError(f"{reader.path}: {what} is an empty (none) NDArray, which cannot be loaded")
    if any(d < 0 for d in shape):
        raise UserError(f"{reader.path}: {what} has a negative dimension in shape {shape}")
    reader.exact(8, f"{what} context")
    flag = reader.scalar("i", f"{what} type flag")
    if flag not in TYPE_FLAGS:
        raise UserError(f"{reader.path}: {what} has unsupported data type flag {flag}")
    data = reader.array(TYPE_FLAGS[flag], math.prod(shape), f"{what} data")
    native = data.astype(data.dtype.newbyteorder("="), copy=False)
    return native.reshape(shape)


def read_mxnet_params(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an MXNet NDArray-list file, by their stored names (`arg:`/`aux:` kept).

    A file saved without names gives the keys "0", "1", ...
    """
    path = str(path)
    if not Path(path).is_file():
        raise UserError(f"{path}: weights file not found")
    with open(path, "rb") as handle:
        reader = _Reader(handle, path)
        header = reader.scalar("Q", "file header")
        if header != LIST_MAGIC:
            raise UserError(f"{path}: not an MXNet .params file (header 0x{header:x}, expected 0x112)")
        reader.scalar("Q", "file header")  # reserved
        count = reader.scalar("Q", "array count")
        arrays = [_read_ndarray(reader, index) for index in range(count)]
        name_count = reader.scalar("Q", "name count")
        if name_count not in (0, count):
            raise UserError(f"{path}: {name_count} names for {count} arrays")
        names = []
        for index in range(name_count):
            length = reader.scalar("Q", f"name #{index}")
            if length > _MAX_NAME_BYTES:
                raise UserError(f"{path}: name #{index} claims {length} bytes; file is corrupt")
            names.append(reader.exact(length, f"name #{index}").decode("utf-8", errors="replace"))
    if not names:
        names = [str(index) for index in range(count)]
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise UserError(f"{path}: duplicate array names {duplicates}")
    return dict(zip(names, arrays))


def _encode_ndarray(array: np.ndarray, layout: str, name: str) -> bytes:
    array = np.asarray(array)  # tobytes() below writes C order whatever the memory layout
    flag = _FLAG_OF_DTYPE.get(array.dtype.newbyteorder("="))
    if flag is None:
        raise ValueError(f"{name}: dtype {array.dtype} has no MXNet type flag")
    if array.ndim == 0 and layout != "v3":
        raise ValueError(f"{name}: a 0-d array means 'none' in the {layout} layout; use layout='v3'")
    shape = array.shape
    if layout == "legacy":
        header = struct.pack(f"<{1 + len(shape)}I", len(shape), *shape)
    else:
        shape64 = struct.pack(f"<i{len(shape)}q", len(shape), *shape)
        if layout == "v1":
            header = struct.pack("<I", V1_MAGIC) + shape64
        else:
            magic = V2_MAGIC if layout == "v2" else V3_MAGIC
            header = struct.pack("<Ii", magic, 0) + shape64  # dense storage
    body = struct.pack("<iii", *_CPU_CONTEXT, flag)
    return header + body + array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def write_mxnet_params(path: str | Path, arrays: Mapping[str, np.ndarray], layout: str = "v2") -> None:
    """Write `arrays` as an MXNet NDArray-list file, names as given (add `arg:`/`aux:` yourself).

    For tests and tools: it lets the reader be checked against every layout without MXNet installed.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    parts = [struct.pack("<QQQ", LIST_MAGIC, 0, len(arrays))]
    parts += [_encode_ndarray(np.asarray(value), layout, name) for name, value in arrays.items()]
    parts.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        encoded = name.encode("utf-8")
        parts.append(struct.pack("<Q", len(encoded)) + encoded)
    with atomic_open(path, "wb") as handle:
        for part in parts:
            handle.write(part)
