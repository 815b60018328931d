"""Model-level accuracy of the weight formats on the real SmolLM2-135M: perplexity against the unquantized model,
and `ironlm convert` round trips."""
import math
from pathlib import Path

import pytest
import torch

from ironlm import LLM, SamplingParams
from ironlm.convert import convert
from ironlm.quant import QuantLinear

TEXT = (Path(__file__).parent / "data" / "perplexity.txt").read_text()


def perplexity(llm: LLM) -> float:
    tokens = llm.tokenizer.encode(TEXT)
    logits = llm.engine.prompt_logits(tokens)  # (T, V)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(tokens[1:]))
    return math.exp(float(nll))


@pytest.fixture(scope="module")
def reference_ppl(gguf_path):
    # The GGUF dequantized to float32: the unquantized reference every format is compared with.
    return perplexity(LLM(str(gguf_path), dtype="float32", quant="none", num_kv_blocks=128))


# The only real weights we have are Q4_1, so each format requantizes Q4_1 values. int4 (scale + min, like Q4_1)
# reproduces them exactly; int8's symmetric grid misses them by ~0.6 % per weight, and its perplexity moved from
# +1.7 % to +2.06 % when prefill attention changed kernels (both match the reference to bf16's last bit):
# rounding activations to int8 turns last-bit differences into whole quantization steps. int4_sym cannot
# express the Q4_1 minimum at all (measured +15.5 %). A broken kernel lands in the thousands.
@pytest.mark.parametrize("quant, tolerance", [("bf16", 0.01), ("int8", 0.03), ("int4", 0.05), ("int4_sym", 0.20)])
def test_perplexity_close_to_reference(gguf_path, reference_ppl, quant, tolerance):
    llm = LLM(str(gguf_path), dtype="float32", quant=quant, num_kv_blocks=128)
    ppl = perplexity(llm)
    assert reference_ppl < 100  # the text is ordinary English: a sane model is not confused by it
    assert abs(ppl - reference_ppl) / reference_ppl < tolerance, (quant, ppl, reference_ppl)


def test_int8_kv_cache_perplexity(gguf_path):
    # Every token as a decode step (chunk=1), so attention reads each earlier token from the KV cache: int8 rows
    # with a scale each against bf16 rows. Measured: 24.06 (bf16 KV) vs 24.34 (int8 KV), +1.1 %.
    def decoded_ppl(kv_cache_dtype: str) -> float:
        llm = LLM(str(gguf_path), kv_cache_dtype=kv_cache_dtype, num_kv_blocks=64)
        tokens = llm.tokenizer.encode(TEXT)
        logits = llm.engine.prompt_logits(tokens, chunk=1)
        return math.exp(float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(tokens[1:]))))

    bf16, int8 = decoded_ppl("bfloat16"), decoded_ppl("int8")
    assert bf16 < 100 and abs(int8 - bf16) / bf16 < 0.03, (bf16, int8)


def test_native_q4_1_perplexity_close_to_reference(gguf_path, reference_ppl):
    ppl = perplexity(LLM(str(gguf_path), dtype="float32", quant="auto", num_kv_blocks=128))
    assert abs(ppl - reference_ppl) / reference_ppl < 0.05


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_convert_round_trip(gguf_path, tmp_path, fmt):
    out = convert(str(gguf_path), fmt, tmp_path / fmt)
    converted = LLM(str(out), dtype="bfloat16", num_kv_blocks=64)
    in_memory = LLM(str(gguf_path), dtype="bfloat16", quant=fmt, num_kv_blocks=64)
    for (name, a), (_, b) in zip(converted.engine.model.named_modules(), in_memory.engine.model.named_modules()):
        if isinstance(b, QuantLinear):
            assert isinstance(a, QuantLinear) and a.fmt == b.fmt, name
            assert b.fmt == (fmt if name != "lm_head" or fmt in ("int8", "bf16") else "int8"), name
            assert torch.equal(a.packed, b.packed), name
    params = SamplingParams(max_tokens=16, temperature=0.0)
    prompt = [{"role": "user", "content": "Who wrote Romeo and Juliet?"}]
    assert converted.chat(prompt, params)[0].token_ids == in_memory.chat(prompt, params)[0].token_ids


def test_convert_refuses_non_empty_directory(gguf_path, tmp_path):
    from ironlm.errors import IronlmError

    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(IronlmError, match="not empty"):
        convert(str(gguf_path), "int8", tmp_path)


def test_converted_model_refuses_another_format(gguf_path, tmp_path):
    from ironlm.errors import ModelLoadError

    out = convert(str(gguf_path), "int8", tmp_path / "m")
    with pytest.raises(ModelLoadError, match="already converted"):
        LLM(str(out), quant="int4", num_kv_blocks=16)
