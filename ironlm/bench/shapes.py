"""Random-weight Hugging Face model directories in the exact shapes of public models.

Speed does not depend on weight values, so `ironlm bench --model-shape NAME` can measure a model nobody has
downloaded. The directory holds config.json (the public shape), model.safetensors (random bf16, written in
chunks so memory stays bounded) and SmolLM2's tokenizer (taken from the embedded GGUF). The embedding keeps
the shape's vocab_size even where it differs from the tokenizer's 49152 tokens: ids past the tokenizer's
vocabulary are valid model inputs but have no text.
"""
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ironlm.errors import IronlmError

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "attention_bias": False,
          "mlp_bias": False, "rope_scaling": None, "torch_dtype": "bfloat16"}

# Values from each model's public config.json on the Hugging Face hub.
SHAPES: dict[str, dict] = {
    "SmolLM2-135M": {**_LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True},
    "SmolLM2-1.7B": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 130000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True},
    "Llama-3.2-1B": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "Qwen2.5-3B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                   "torch_dtype": "bfloat16", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768,
                   "max_window_layers": 36, "rope_scaling": None},
    "Llama-2-7B": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False},
    "Llama-3-8B": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False},
}

_POOL_SIZE = 1 << 22  # random bf16 values reused at random offsets: values do not matter for speed
_CHUNK = 1 << 22      # elements written per call


def shape_config(name: str) -> dict:
    """The public config.json fields of a shape; IronlmError naming the choices if unknown."""
    if name not in SHAPES:
        raise IronlmError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    return dict(SHAPES[name])


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape for a llama/qwen2-style config, in checkpoint order."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    qkv_bias = config["model_type"] == "qwen2" or bool(config.get("attention_bias"))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        if qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (heads * head_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_heads * head_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_heads * head_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def num_params(config: dict) -> int:
    """Parameter count of a config (a tied lm_head counted once, as the hub does)."""
    return sum(int(np.prod(s)) for s in tensor_shapes(config).values())


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0,
                             progress: Callable[[int, int], None] | None = None) -> None:
    """Write bf16 tensors of these shapes (norm weights 1, others ~N(0, 0.02)) without holding more than a chunk."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    # bf16 is the top half of an fp32: keep the high 16 bits.
    pool = ((rng.standard_normal(_POOL_SIZE, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    ones = np.full(_CHUNK, 0x3F80, dtype=np.uint16)  # bf16 1.0
    done = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes.items():
            remaining = int(np.prod(shape))
            is_norm = name.endswith("norm.weight")
            while remaining:
                n = min(remaining, _CHUNK)
                if is_norm:
                    f.write(ones[:n].tobytes())
                else:
                    start = int(rng.integers(0, _POOL_SIZE - n + 1))
                    f.write(pool[start:start + n].tobytes())
                remaining -= n
                done += n * 2
                if progress is not None:
                    progress(done, offset)


def shapes_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ironlm/shapes (default ~/.cache/ironlm/shapes)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ironlm" / "shapes"


def build_shape_model(name: str, cache_dir: Path | None = None, config: dict | None = None,
                      progress: Callable[[int, int], None] | None = None) -> Path:
    """The directory of a random-weight model in shape `name`, built on first use and reused after.

    `config` replaces the public config (tests use it for tiny shapes). The tokenizer is SmolLM2's, from the
    embedded GGUF; bos/eos ids in config.json are set to that tokenizer's.
    """
    config = dict(config) if config is not None else shape_config(name)
    target = (cache_dir or shapes_cache_dir()) / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target  # built in a .partial directory and renamed into place only when complete
    from ironlm.formats import default_model_path, load_checkpoint

    tokenizer = load_checkpoint(default_model_path()).tokenizer
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save(tmp)
    write_random_safetensors(tmp / "model.safetensors", tensor_shapes(config), progress=progress)
    config["bos_token_id"] = tokenizer.bos_token_id
    config["eos_token_id"] = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None
    config["ironlm_note"] = (f"random weights in the shape of {name}; tokenizer is SmolLM2's "
                             f"({tokenizer.vocab_size} tokens), vocab_size kept at the shape's {config['vocab_size']}")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target
