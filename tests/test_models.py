"""Model math against Hugging Face transformers on tiny random models of every supported architecture."""
import pytest
import torch

from ironlm import LLM, SamplingParams

ARCHS = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("llama", {"attention_bias": True}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
]


def arch_id(case):
    arch, overrides = case
    return arch + ("-" + "-".join(overrides) if overrides else "")


@pytest.fixture(scope="module", params=ARCHS, ids=arch_id)
def tiny_pair(request, make_tiny_model):
    arch, overrides = request.param
    directory, hf_model = make_tiny_model(arch, **overrides)
    llm = LLM(str(directory), dtype="float32", threads=2, max_num_seqs=4, block_size=4,
              max_num_batched_tokens=64, num_kv_blocks=128)
    return llm, hf_model


def test_logits_match_transformers(tiny_pair):
    llm, hf_model = tiny_pair
    tokens = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = llm.engine.prompt_logits(tokens)  # (T, V)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([tokens])).logits[0]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_match_transformers(tiny_pair):
    llm, hf_model = tiny_pair
    prompts = [[5, 17, 42, 99, 3], list(range(100, 123))]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert result.token_ids == expected.tolist()
        assert result.finish_reason == "length"


def test_greedy_tokens_with_repetition_penalty_match_transformers(tiny_pair):
    # The penalty over prompt and output tokens, kept across steps for each sequence of a batch, as transformers
    # applies it to the whole input_ids every step.
    llm, hf_model = tiny_pair
    prompts = [[5, 17, 42, 99, 3, 5, 5], list(range(100, 123))]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                                         do_sample=False, repetition_penalty=1.3, eos_token_id=None,
                                         pad_token_id=0)[0, len(prompt):]
        assert result.token_ids == expected.tolist()


def test_bfloat16_close_to_float32(tiny_pair, make_tiny_model):
    llm, hf_model = tiny_pair
    tokens = list(range(1, 30))
    reference = llm.engine.prompt_logits(tokens)
    bf16 = LLM(str(llm.checkpoint.path), dtype="bfloat16", threads=2, num_kv_blocks=64, block_size=4)
    ours = bf16.engine.prompt_logits(tokens)
    # bf16 keeps 8 bits of mantissa: compare the distributions, not the digits.
    assert torch.nn.functional.cosine_similarity(ours, reference, dim=-1).min() > 0.99


def test_bf16_checkpoint_at_float32_keeps_bf16_weights(make_tiny_model, tmp_path):
    """A bf16 checkpoint run in float32: where the bf16 kernel multiplies float32 activations, the weights stay
    bf16 (half the bytes of float32, nothing lost) and the logits are float32 math on those same weights."""
    from transformers import AutoModelForCausalLM

    from ironlm.quant import QuantLinear, bf16_rounds_activations

    directory, _ = make_tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    bf16_dir = tmp_path / "bf16"
    model.save_pretrained(bf16_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (bf16_dir / name).write_bytes((directory / name).read_bytes())
    llm = LLM(str(bf16_dir), dtype="float32", threads=2, num_kv_blocks=64, block_size=4)
    down = llm.engine.model.model.layers[0].mlp.down_proj
    if bf16_rounds_activations():
        assert not isinstance(down, QuantLinear)  # bf16 products would round the activations: torch's float32
    else:
        assert isinstance(down, QuantLinear) and down.fmt == "bf16"
    tokens = list(range(3, 40))
    with torch.no_grad():
        expected = model.float()(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(llm.engine.prompt_logits(tokens), expected, atol=1e-4, rtol=1e-4)
