"""Hugging Face model directory: config.json + *.safetensors (optionally sharded with an index), memory-mapped."""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Any

import numpy as np

from ironlm.errors import ModelLoadError
from ironlm.formats.checkpoint import Checkpoint, WeightSource

MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"
# dtype name -> numpy storage dtype (BF16 stored as uint16 and re-viewed by torch)
SAFETENSORS_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I8": np.int8,
    "U8": np.uint8,
    "I32": np.int32,
    "I64": np.int64,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FIX_HINT = "re-download or re-save the checkpoint with safetensors"


def _bad(path: pathlib.Path, problem: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {problem}; {FIX_HINT}")


def _parse_header(path: pathlib.Path, file_size: int) -> tuple[int, dict[str, Any]]:
    """Read and validate the JSON header; returns (data section start, {name: entry})."""
    if file_size < 8:
        raise _bad(path, f"file is {file_size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > file_size - 8:
            raise _bad(path, f"header size {header_size} is longer than the file ({file_size} bytes, truncated?)")
        if header_size > MAX_HEADER_BYTES:
            raise _bad(path, f"header size {header_size} exceeds the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"header is a JSON {type(header).__name__}, expected an object")
    header.pop("__metadata__", None)
    return 8 + header_size, header


def _validate_entry(path: pathlib.Path, name: str, entry: Any, data_size: int) -> tuple[str, tuple, int, int]:
    """(dtype, shape, begin, end) of one header entry, or ModelLoadError saying which field is wrong."""
    if not isinstance(entry, dict):
        raise _bad(path, f"tensor {name!r}: header entry is not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _bad(path, f"tensor {name!r}: dtype {dtype!r} is not supported ({', '.join(SAFETENSORS_DTYPES)})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _bad(path, f"tensor {name!r}: data_offsets {offsets!r} is not a [begin, end] pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _bad(path, f"tensor {name!r}: data_offsets {offsets} lie outside the {data_size}-byte data section")
    expected = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
    if end - begin != expected:
        problem = f"data_offsets {offsets} hold {end - begin} bytes but {dtype} {shape} needs {expected}"
        raise _bad(path, f"tensor {name!r}: {problem}")
    return dtype, tuple(shape), begin, end


def read_safetensors(path: pathlib.Path) -> dict[str, WeightSource]:
    """Validate one .safetensors file and return zero-copy mmap views of its tensors, by name."""
    file_size = os.path.getsize(path)
    data_start, header = _parse_header(path, file_size)
    data_size = file_size - data_start
    entries = {name: _validate_entry(path, name, entry, data_size) for name, entry in header.items()}
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise _bad(path, f"tensors {prev!r} and {name!r} overlap in the data section")
    if not entries:
        return {}
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file untouched
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
        data = mm[data_start + begin : data_start + end].view(SAFETENSORS_DTYPES[dtype]).reshape(shape)
        out[name] = WeightSource(name=name, shape=shape, dtype=dtype, nbytes=end - begin, data=data)
    return out


def _read_json(path: pathlib.Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read {what} ({e}); fix or replace the file") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: {what} must be a JSON object, not {type(value).__name__}; fix the file")
    return value


def _shard_path(directory: pathlib.Path, index_path: pathlib.Path, filename: str) -> pathlib.Path:
    """A shard named by the index, refused unless its name stays inside the directory.

    Checked on the name, not the resolved path: Hugging Face cache snapshots are symlinks into a blob store."""
    relative = pathlib.PurePosixPath(filename)
    if relative.is_absolute() or ".." in relative.parts or "\\" in filename:
        raise ModelLoadError(f"{index_path}: shard {filename!r} lies outside the model directory; fix the index")
    shard = directory / relative
    if not shard.is_file():
        raise ModelLoadError(f"{index_path}: shard {filename!r} does not exist in {directory}; download it")
    return shard


def _indexed_tensors(directory: pathlib.Path, index_path: pathlib.Path) -> dict[str, WeightSource]:
    weight_map = _read_json(index_path, "the safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index_path}: no 'weight_map' object mapping tensor names to files; fix the index")
    shards: dict[str, dict[str, WeightSource]] = {}
    tensors = {}
    for name, filename in weight_map.items():
        if not isinstance(filename, str) or not filename:
            raise ModelLoadError(f"{index_path}: weight_map names shard {filename!r} for {name!r}; fix the index")
        if filename not in shards:
            shards[filename] = read_safetensors(_shard_path(directory, index_path, filename))
        if name not in shards[filename]:
            raise ModelLoadError(f"{index_path}: tensor {name!r} is not in shard {filename!r}; re-download the model")
        tensors[name] = shards[filename][name]
    return tensors


def _unindexed_tensors(directory: pathlib.Path, files: list[pathlib.Path]) -> dict[str, WeightSource]:
    tensors: dict[str, WeightSource] = {}
    origin: dict[str, pathlib.Path] = {}
    for file in files:
        for name, source in read_safetensors(file).items():
            if name in tensors:
                where = f"both {origin[name].name} and {file.name}"
                raise ModelLoadError(f"{directory}: tensor {name!r} is in {where}; remove the stray file")
            tensors[name] = source
            origin[name] = file
    return tensors


def load_safetensors_dir(directory: pathlib.Path) -> Checkpoint:
    """Load a Hugging Face model directory (config.json + safetensors weights + tokenizer files)."""
    from ironlm.tokenizer import Tokenizer  # lazy: the tokenizer module is optional for importing this one

    index_path = directory / INDEX_FILE
    files = sorted(directory.glob("*.safetensors"))
    if not files and not index_path.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            found = ", ".join(pickles[:3])
            raise ModelLoadError(f"{directory}: only pickle checkpoints ({found}); we never unpickle; "
                                 "convert to safetensors")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory}: no config.json; pass a Hugging Face model directory or a .gguf file")
    config = _read_json(config_path, "config.json")
    if index_path.is_file():
        tensors = _indexed_tensors(directory, index_path)
    elif files:
        tensors = _unindexed_tensors(directory, files)
    else:
        raise ModelLoadError(f"{directory}: no *.safetensors weights found; download the model's safetensors files")
    if not tensors:
        raise ModelLoadError(f"{directory}: the safetensors files hold no tensors; download the model's weights")
    tokenizer = Tokenizer.from_dir(directory)
    return Checkpoint(directory, "safetensors", config, tensors, tokenizer, name=directory.resolve().name)
