"""GGUF model -> Hugging Face view: metadata to config.json fields, tensor names to HF names, Q/K rows un-permuted."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import numpy as np

from ironlm.errors import ModelLoadError
from ironlm.formats.checkpoint import Checkpoint, WeightSource
from ironlm.formats.gguf_file import GGUFFile, GGUFTensorInfo, read_gguf

# GGUF general.architecture -> HF model_type, HF architectures entry
SUPPORTED_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
# llama.cpp's converter interleaves the rotary halves of Q/K rows for these archs only
PERMUTED_QK_ARCHS = ("llama", "mistral")

TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# yarn: GGUF rope.scaling.* key -> HF rope_scaling key
YARN_KEYS = (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"), ("attn_factor", "attention_factor"))
LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _get(metadata: dict[str, Any], path: pathlib.Path, key: str, kind: type | tuple[type, ...], default: Any = ...):
    """A metadata value of the expected Python type; ModelLoadError if missing (without default) or mistyped."""
    if key not in metadata:
        if default is ...:
            raise ModelLoadError(f"{path}: GGUF metadata key {key} is missing; re-convert with a current llama.cpp")
        return default
    value = metadata[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ModelLoadError(f"{path}: GGUF metadata {key} = {value!r} has the wrong type; re-convert the model")
    return value


def _positive(metadata: dict[str, Any], path: pathlib.Path, key: str, default: Any = ...) -> int:
    value = _get(metadata, path, key, int, default)
    if value is not None and value <= 0:
        raise ModelLoadError(f"{path}: GGUF metadata {key} = {value} must be positive; re-convert the model")
    return value


def _rope_scaling(metadata: dict[str, Any], path: pathlib.Path, arch: str, has_rope_freqs: bool) -> dict | None:
    kind = _get(metadata, path, f"{arch}.rope.scaling.type", str, None)
    factor = _get(metadata, path, f"{arch}.rope.scaling.factor", (int, float), None)
    if kind is None and f"{arch}.rope.scale_linear" in metadata:
        kind, factor = "linear", _get(metadata, path, f"{arch}.rope.scale_linear", (int, float))
    if kind in (None, "none"):
        return {"rope_type": "llama3_freqs"} if has_rope_freqs else None
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"{path}: GGUF {arch}.rope.scaling.type {kind!r} is not supported (none, linear, yarn)")
    if factor is None:
        raise ModelLoadError(f"{path}: GGUF metadata {arch}.rope.scaling.factor is missing for {kind} rope scaling")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        original = _positive(metadata, path, f"{arch}.rope.scaling.original_context_length", None)
        if original is not None:
            scaling["original_max_position_embeddings"] = original
        for gguf_key, hf_key in YARN_KEYS:
            value = _get(metadata, path, f"{arch}.rope.scaling.{gguf_key}", (int, float), None)
            if value is not None:
                scaling[hf_key] = float(value)
    return scaling


def gguf_config(gguf: GGUFFile) -> dict[str, Any]:
    """HF config.json fields from GGUF metadata (and which tensors exist)."""
    md, path = gguf.metadata, gguf.path
    arch = _get(md, path, "general.architecture", str)
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)}); "
            "use a model of a supported family"
        )
    model_type, hf_class = SUPPORTED_ARCHS[arch]
    hidden_size = _positive(md, path, f"{arch}.embedding_length")
    num_heads = _positive(md, path, f"{arch}.attention.head_count")
    num_kv_heads = _positive(md, path, f"{arch}.attention.head_count_kv", num_heads)
    if num_heads % num_kv_heads:
        raise ModelLoadError(f"{path}: head_count {num_heads} is not a multiple of head_count_kv {num_kv_heads}")
    if hidden_size % num_heads and f"{arch}.attention.key_length" not in md:
        raise ModelLoadError(f"{path}: embedding_length {hidden_size} is not a multiple of head_count {num_heads}")
    head_dim = _positive(md, path, f"{arch}.attention.key_length", hidden_size // num_heads)
    value_dim = _positive(md, path, f"{arch}.attention.value_length", head_dim)
    rope_dim = _positive(md, path, f"{arch}.rope.dimension_count", head_dim)
    if value_dim != head_dim or rope_dim != head_dim or head_dim % 2:
        raise ModelLoadError(
            f"{path}: key_length {head_dim}, value_length {value_dim} and rope.dimension_count {rope_dim} must be "
            "equal and even; this model shape is not supported"
        )
    tokens = md.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if isinstance(tokens, list) else _positive(md, path, f"{arch}.vocab_size")
    embed = next((t for t in gguf.tensors if t.name == "token_embd.weight"), None)
    if embed is not None:
        vocab_size = embed.shape[0]  # the model's size; a padded embedding may have more rows than tokens
    names = {t.name for t in gguf.tensors}
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_class],
        "hidden_size": hidden_size,
        "intermediate_size": _positive(md, path, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _positive(md, path, f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(_get(md, path, f"{arch}.attention.layer_norm_rms_epsilon", (int, float))),
        "rope_theta": float(_get(md, path, f"{arch}.rope.freq_base", (int, float), 10000.0)),
        "rope_scaling": _rope_scaling(md, path, arch, "rope_freqs.weight" in names),
        "max_position_embeddings": _positive(md, path, f"{arch}.context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": _get(md, path, "tokenizer.ggml.bos_token_id", int, None),
        "eos_token_id": _get(md, path, "tokenizer.ggml.eos_token_id", int, None),
    }
    dense = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    if embed is not None and embed.qtype.name in dense:
        config["torch_dtype"] = dense[embed.qtype.name]
    return config


def hf_tensor_name(gguf_name: str, num_layers: int) -> str | None:
    """The HF parameter name for a GGUF tensor name, or None if it is not a tensor we know."""
    if gguf_name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[gguf_name]
    match = LAYER_PATTERN.fullmatch(gguf_name)
    if match is None or match[2] not in LAYER_NAMES or int(match[1]) >= num_layers:
        return None
    return f"model.layers.{int(match[1])}.{LAYER_NAMES[match[2]]}.{match[3]}"


def unpermute_order(num_rows: int, num_heads: int) -> np.ndarray:
    """For each HF row of a Q/K projection, the GGUF row holding it.

    llama.cpp stores HF rows reshaped (heads, 2, head_dim/2) as (heads, head_dim/2, 2), i.e. the two rotary
    halves interleaved; this index undoes that."""
    head_dim = num_rows // num_heads
    order = np.arange(num_rows).reshape(num_heads, head_dim // 2, 2)  # GGUF row ids at (h, j, half)
    return np.ascontiguousarray(order.transpose(0, 2, 1)).reshape(num_rows)  # (h, half, j) = HF order


def _weight_source(gguf: GGUFFile, info: GGUFTensorInfo, name: str, num_heads: int | None) -> WeightSource:
    data = gguf.tensor_data(info)
    row_order = None
    if num_heads is not None:
        num_rows = info.shape[0]
        if num_rows % (2 * num_heads):
            problem = f"{num_rows} rows is not a multiple of 2 x {num_heads} heads"
            raise ModelLoadError(f"{gguf.path}: tensor {info.name}: {problem}; re-convert the model")
        row_order = unpermute_order(num_rows, num_heads)
    return WeightSource(name, info.shape, info.qtype.name, info.nbytes, data, row_order)


def load_gguf(path: pathlib.Path) -> Checkpoint:
    """Load a GGUF model file: validated header, mmap'd tensors under HF names, HF config and tokenizer."""
    from ironlm.tokenizer import Tokenizer  # lazy: the tokenizer module is optional for importing this one

    gguf = read_gguf(path)
    config = gguf_config(gguf)
    arch = gguf.metadata["general.architecture"]
    num_layers = config["num_hidden_layers"]
    permute_heads = {}
    if arch in PERMUTED_QK_ARCHS:
        permute_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors: dict[str, WeightSource] = {}
    for info in gguf.tensors:
        name = hf_tensor_name(info.name, num_layers)
        if name is None:
            raise ModelLoadError(f"{path}: tensor {info.name} is not part of a plain {arch} model; not supported")
        kind = info.name.split(".")[2] if info.name.startswith("blk.") else None
        tensors[name] = _weight_source(gguf, info, name, permute_heads.get(kind))
    for gguf_name in ("token_embd.weight", "output_norm.weight"):
        if TOP_LEVEL_NAMES[gguf_name] not in tensors:
            raise ModelLoadError(f"{path}: tensor {gguf_name} is missing; re-convert the model")
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata, source=str(path))
    return Checkpoint(path=path, format="gguf", config=config, tensors=tensors, tokenizer=tokenizer, name=path.stem)
