"""GGUF v2/v3 (little-endian) reader: header, metadata and tensor infos checked against the file size before use."""

from __future__ import annotations

import math
import os
import pathlib
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ironlm.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
HEADER_BYTES = 24  # magic, u32 version, u64 tensor_count, u64 kv_count
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
MAX_ARRAY_DEPTH = 4
FIX_HINT = "the file is damaged or not a GGUF model; re-download or re-convert it"

# value type -> (struct format, numpy dtype) for fixed-size scalars
SCALAR_TYPES = {
    GGUFValueType.UINT8: ("<B", np.uint8),
    GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16),
    GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32),
    GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.FLOAT32: ("<f", np.float32),
    GGUFValueType.BOOL: ("<B", np.uint8),
    GGUFValueType.UINT64: ("<Q", np.uint64),
    GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT64: ("<d", np.float64),
}
# GGML storage types torch can view directly (numpy dtype of one element)
DENSE_NUMPY = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.BF16: np.uint16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the row length (reverse of torch)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


@dataclass
class GGUFFile:
    path: pathlib.Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    mm: np.ndarray  # the whole file, uint8, copy-on-write mmap

    def tensor_data(self, info: GGUFTensorInfo) -> np.ndarray:
        """Zero-copy view: dense types as (torch shape) elements, block types as uint8 (rows, bytes_per_row)."""
        raw = self.mm[info.offset : info.offset + info.nbytes]
        if info.qtype in DENSE_NUMPY:
            return raw.view(DENSE_NUMPY[info.qtype]).reshape(info.shape)
        rows = math.prod(info.dims[1:])
        return raw.reshape(rows, info.nbytes // rows)


class _Cursor:
    """Reads little-endian values from the mapped file; every read is bounds-checked first."""

    def __init__(self, path: pathlib.Path, buf: memoryview):
        self.path = path
        self.buf = buf
        self.pos = 0

    def fail(self, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {problem} (at byte {self.pos}); {FIX_HINT}")

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def need(self, num_bytes: int, what: str) -> None:
        if num_bytes > self.remaining:
            raise self.fail(f"file truncated: {what} needs {num_bytes} bytes but only {self.remaining} remain")

    def check_count(self, count: int, min_item_bytes: int, what: str) -> None:
        """Refuse a count of items that could not fit in the rest of the file, before looping over it."""
        if count > self.remaining // min_item_bytes:
            raise self.fail(
                f"{what} {count} is absurd: it needs at least {count * min_item_bytes} bytes but only "
                f"{self.remaining} remain (file truncated?)"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"length of {what}")
        if length > self.remaining:
            raise self.fail(f"{what}: string length {length} exceeds the {self.remaining} bytes left (truncated?)")
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what}: string is not valid UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in SCALAR_TYPES:
            value = self.scalar(SCALAR_TYPES[vtype][0], f"value of {key}")
            if vtype == GGUFValueType.FLOAT32:
                return float(str(np.float32(value)))  # shortest decimal: 1e-05, not 9.999999747378752e-06
            return bool(value) if vtype == GGUFValueType.BOOL else value
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of {key}")
        if vtype == GGUFValueType.ARRAY:
            return self.array(key, depth)
        raise self.fail(f"metadata {key}: unknown value type {vtype}")

    def array(self, key: str, depth: int) -> list:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"metadata {key}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        item_type = self.scalar("<I", f"array type of {key}")
        count = self.scalar("<Q", f"array length of {key}")
        if item_type in SCALAR_TYPES:
            dtype = np.dtype(SCALAR_TYPES[item_type][1]).newbyteorder("<")
            self.check_count(count, dtype.itemsize, f"metadata {key}: array length")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return (values != 0).tolist() if item_type == GGUFValueType.BOOL else values.tolist()
        min_item = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}.get(item_type)
        if min_item is None:
            raise self.fail(f"metadata {key}: unknown array item type {item_type}")
        self.check_count(count, min_item, f"metadata {key}: array length")
        if item_type == GGUFValueType.STRING:
            return [self.string(f"{key}[{i}]") for i in range(count)]
        return [self.array(key, depth + 1) for _ in range(count)]


def _read_metadata(cur: _Cursor, kv_count: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.scalar("<I", f"value type of {key}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(vtype, key)
    return metadata


def _read_tensor_info(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]:
    name = cur.string(f"name of tensor #{index}")
    n_dims = cur.scalar("<I", f"n_dims of tensor {name}")
    if not 1 <= n_dims <= 4:
        raise cur.fail(f"tensor {name}: n_dims {n_dims} is not in 1..4")
    dims = tuple(cur.scalar("<Q", f"dims of tensor {name}") for _ in range(n_dims))
    if any(d == 0 for d in dims) or math.prod(dims) >= 2**62:
        raise cur.fail(f"tensor {name}: dims {list(dims)} are not positive or overflow")
    type_id = cur.scalar("<I", f"type of tensor {name}")
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise cur.fail(f"tensor {name}: unknown tensor type id {type_id}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise cur.fail(f"tensor {name}: tensor type {qtype.name} has no known block size")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if dims[0] % block_size:
        raise cur.fail(f"tensor {name}: row length {dims[0]} is not a multiple of {qtype.name} block size {block_size}")
    nbytes = math.prod(dims[1:]) * (dims[0] // block_size) * type_size
    offset = cur.scalar("<Q", f"offset of tensor {name}")
    return name, dims, qtype, offset, nbytes


def read_gguf(path: pathlib.Path) -> GGUFFile:
    """Parse and validate a GGUF file; the whole file is memory-mapped once and tensors are views of it."""
    file_size = os.path.getsize(path)
    if file_size < HEADER_BYTES:
        raise ModelLoadError(f"{path}: file truncated: {file_size} bytes is shorter than a GGUF header; {FIX_HINT}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path}: bad magic {magic!r}, expected {GGUF_MAGIC!r}; {FIX_HINT}")
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file untouched
    cur = _Cursor(path, memoryview(mm))
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"GGUF version {version} is not supported (supported: 2, 3; big-endian files are not)")
    tensor_count = cur.scalar("<Q", "tensor_count")
    kv_count = cur.scalar("<Q", "kv_count")
    cur.check_count(kv_count, MIN_KV_BYTES, "kv_count")
    cur.check_count(tensor_count, MIN_TENSOR_INFO_BYTES, "tensor_count")
    metadata = _read_metadata(cur, kv_count)
    cur.check_count(tensor_count, MIN_TENSOR_INFO_BYTES, "tensor_count")
    infos = [_read_tensor_info(cur, i) for i in range(tensor_count)]

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a positive power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors: list[GGUFTensorInfo] = []
    seen: set[str] = set()
    for name, dims, qtype, offset, nbytes in infos:
        if name in seen:
            raise cur.fail(f"tensor {name} appears twice")
        seen.add(name)
        if offset % alignment:
            raise cur.fail(f"tensor {name}: offset {offset} is not a multiple of the alignment {alignment}")
        if data_start + offset + nbytes > file_size:
            raise ModelLoadError(
                f"{path}: tensor {name}: data [{data_start + offset}, {data_start + offset + nbytes}) lies past "
                f"the end of the file ({file_size} bytes, truncated?); {FIX_HINT}"
            )
        tensors.append(GGUFTensorInfo(name, dims, qtype, data_start + offset, nbytes))
    spans = sorted(tensors, key=lambda t: t.offset)
    for prev, cur_t in zip(spans, spans[1:]):
        if cur_t.offset < prev.offset + prev.nbytes:
            raise ModelLoadError(f"{path}: tensors {prev.name} and {cur_t.name} overlap; {FIX_HINT}")
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors, mm=mm)
