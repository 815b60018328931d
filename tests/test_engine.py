"""The engine step loop on a tiny model: paged KV equals full recompute, stops, seeds, streaming, bad prompts."""
import pytest
import torch

from ironlm import LLM, SamplingParams
from ironlm.errors import ModelLoadError, RequestError


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    directory, _ = make_tiny_model("llama")
    return directory


@pytest.fixture(scope="module")
def llm(tiny_dir):
    # Small blocks and a small token budget so prompts are chunked and cross many block boundaries.
    return LLM(str(tiny_dir), dtype="float32", threads=2, block_size=4, num_kv_blocks=256, max_num_seqs=8,
               max_num_batched_tokens=16)


def full_recompute_greedy(llm: LLM, prompt: list[int], num_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(int(llm.engine.prompt_logits(tokens)[-1].argmax()))  # fresh prefill each time: no cache reuse
    return tokens[len(prompt):]


def test_paged_cache_equals_full_recompute(llm):
    prompts = [list(range(3, 40)), [7, 8, 9], list(range(200, 221))]
    results = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == full_recompute_greedy(llm, prompt, 20)


def test_prefix_cache_hit_gives_same_tokens(llm):
    shared = list(range(50, 90))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": shared + [1, 2]}, params)[0]
    hits_before = llm.engine.block_manager.num_prefix_hits
    second = llm.generate({"prompt_token_ids": shared + [1, 2]}, params)[0]
    assert llm.engine.block_manager.num_prefix_hits > hits_before
    assert second.token_ids == first.token_ids


def test_preemption_gives_same_tokens(tiny_dir):
    # Too few blocks for all sequences at once: some are preempted and recomputed.
    small = LLM(str(tiny_dir), dtype="float32", threads=2, block_size=4, num_kv_blocks=24, max_num_seqs=8,
                max_num_batched_tokens=64, enable_prefix_caching=False)
    prompts = [list(range(10 * i, 10 * i + 12)) for i in range(6)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    results = small.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert any(r.metrics["num_preemptions"] > 0 for r in results)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == full_recompute_greedy(small, prompt, 16)
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks


def test_seed_reproducible_and_independent_of_batch(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = {"prompt_token_ids": [11, 12, 13]}
    alone = llm.generate(prompt, params)[0].token_ids
    batched = llm.generate([{"prompt_token_ids": [99, 98]}, prompt], [SamplingParams(max_tokens=5), params])[1]
    assert batched.token_ids == alone
    other_seed = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=4321, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_stop_token_ids_and_max_tokens(llm):
    greedy = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=10, temperature=0.0,
                                                                          ignore_eos=True))[0]
    stop_at = greedy.token_ids[3]
    stopped = llm.generate({"prompt_token_ids": [5, 6, 7]},
                           SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_at], ignore_eos=True))[0]
    first = greedy.token_ids.index(stop_at)
    assert stopped.token_ids == greedy.token_ids[: first + 1]
    assert stopped.finish_reason == "stop"
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 10


def test_stop_string_truncates_text(llm):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, skip_special_tokens=False)
    full = llm.generate({"prompt_token_ids": [5, 6, 7]}, params)[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert stop
    params.stop = [stop]
    stopped = llm.generate({"prompt_token_ids": [5, 6, 7]}, params)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]


def test_streaming_text_equals_final_text(llm):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=["zzz-never"])
    pieces, final = [], None
    for out in llm.stream([21, 22, 23], params):
        pieces.append(out.new_text)
        final = out
    assert final.finished
    assert "".join(pieces) == final.text
    assert final.text == llm.tokenizer.decode(final.token_ids)


def test_prompt_longer_than_context_is_refused(llm):
    with pytest.raises(RequestError, match="context"):
        llm.generate({"prompt_token_ids": [1] * (llm.engine.max_model_len + 5)}, SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [10 ** 9]}, SamplingParams(max_tokens=1))
    assert not llm.engine.has_unfinished()


def test_generation_stops_at_context_end(tiny_dir):
    short = LLM(str(tiny_dir), dtype="float32", threads=2, max_model_len=24, block_size=4, num_kv_blocks=64)
    result = short.generate({"prompt_token_ids": list(range(20))},
                            SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 4


def test_asked_for_context_is_held_past_the_default_share(tiny_dir, monkeypatch):
    """Where half the free memory bounds the context, asking for a length holds it whole while memory allows."""
    from ironlm import hardware
    from ironlm.engine.kv_cache import kv_bytes_per_block

    settings = dict(dtype="float32", threads=1, block_size=16, max_num_seqs=4)
    probe = LLM(str(tiny_dir), **settings).engine
    weights = sum(t.nbytes for t in probe.checkpoint.tensors.values())
    per_token = kv_bytes_per_block(probe.args, 16, probe.kv_dtype) // 16
    monkeypatch.setattr(hardware, "MIN_KV_CACHE_BYTES", 0)
    # Memory beyond the weights for 320 tokens: the default share holds 160.
    monkeypatch.setattr(hardware, "available_memory_bytes", lambda: weights + 320 * per_token)
    assert LLM(str(tiny_dir), **settings).engine.max_model_len == 160
    assert LLM(str(tiny_dir), max_model_len=256, **settings).engine.max_model_len == 256
    bounded = LLM(str(tiny_dir), max_model_len=512, **settings).engine  # more than the memory holds
    assert bounded.max_model_len == 320 and bounded.kv_bounds_context


def test_max_tokens_zero_scores_the_prompt_only(llm):
    prompt = list(range(3, 40))
    scored = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert scored.token_ids == [] and scored.text == "" and scored.finish_reason == "length"
    reference = torch.log_softmax(llm.engine.prompt_logits(prompt).float(), dim=-1)  # (T, V)
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        assert scored.prompt_logprobs[position].logprob == pytest.approx(
            float(reference[position - 1, prompt[position]]), abs=1e-4)
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.usage == 0


def test_bad_sampling_params_are_refused(llm):
    for bad in (dict(max_tokens=-1), dict(temperature=-1.0), dict(top_p=0.0), dict(min_p=2.0), dict(logprobs=99),
                dict(stop_token_ids=[10 ** 9])):
        with pytest.raises(RequestError):
            llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(**bad))
    assert not llm.engine.has_unfinished()


def test_logprobs_are_log_softmax_of_logits(llm):
    prompt = [31, 32, 33]
    out = next(iter(llm.stream(prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=3))))
    expected = torch.log_softmax(llm.engine.prompt_logits(prompt)[-1], -1)
    result = out.logprobs[0]
    assert result.logprob == pytest.approx(float(expected.max()), abs=1e-4)
    assert [t for t, _ in result.top_logprobs] == expected.topk(3).indices.tolist()


def test_prompt_logprobs_match_transformers(llm, make_tiny_model):
    # Prompts chunked by the 16-token budget, batched with a second prompt, and one prefix-cached before.
    _, hf = make_tiny_model("llama")
    prompts = [list(range(5, 45)), list(range(60, 73)), [9]]
    llm.generate({"prompt_token_ids": prompts[0][:30]}, SamplingParams(max_tokens=1))  # fills the prefix cache
    results = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            reference = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)  # (T, V)
        entries = result.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for position, entry in enumerate(entries[1:], start=1):
            expected = reference[position - 1]
            assert entry.token_id == prompt[position]
            assert entry.logprob == pytest.approx(float(expected[prompt[position]]), abs=1e-4)
            top_ids, top_values = zip(*entry.top_logprobs)
            assert list(top_ids) == expected.topk(3).indices.tolist()
            assert list(top_values) == pytest.approx(expected.topk(3).values.tolist(), abs=1e-4)
    assert llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=1))[0].prompt_logprobs is None
    with pytest.raises(RequestError):
        llm.generate("x", SamplingParams(prompt_logprobs=21))


def test_chat_template_replaces_the_models(tiny_dir, hf_tokenizer_dir):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}<|im_start|>"
    llm = LLM(str(tiny_dir), dtype="float32", chat_template=template, num_kv_blocks=64)
    assert llm.chat_prompt([{"role": "user", "content": "hi"}]) == llm.tokenizer.encode("[user] hi\n<|im_start|>",
                                                                                          add_special_tokens=False)
    assert llm.tokenizer.chat_template == template
    with pytest.raises(ModelLoadError, match="--chat-template has a syntax error"):
        LLM(str(tiny_dir), dtype="float32", chat_template="{% if %}")
    # chat_template_kwargs reach the template as variables (Qwen3's enable_thinking), but not its own inputs
    thinking = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, chat_template=(
        "{{ messages[0].content }}{% if enable_thinking is defined and not enable_thinking %} /no_think{% endif %}"))
    hi = [{"role": "user", "content": "hi"}]
    assert thinking.tokenizer.decode(thinking.chat_prompt(hi, chat_template_kwargs={"enable_thinking": False})) == \
        "hi /no_think"
    assert thinking.tokenizer.decode(thinking.chat_prompt(hi)) == "hi"
    for name in ("messages", "add_generation_prompt", "chat_template", "_private", "not a name"):
        with pytest.raises(RequestError) as info:
            thinking.chat(hi, chat_template_kwargs={name: 1})
        assert info.value.param == "chat_template_kwargs"


def test_chunked_prompt_logits_read_the_cache_like_one_prefill(llm):
    # chunk=1 runs every token as a decode step over the paged cache; float32 KV: the same logits.
    tokens = list(range(5, 60))
    full = llm.engine.prompt_logits(tokens)
    torch.testing.assert_close(llm.engine.prompt_logits(tokens, chunk=1), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(llm.engine.prompt_logits(tokens, chunk=7), full, rtol=1e-4, atol=1e-4)


def test_int8_kv_cache(tiny_dir):
    # The same memory holds about twice the blocks; decoding over int8 rows stays close to float32 KV, and
    # prefix hits, chunked prompts and preemption run on it (blocks: 24 for 8 sequences).
    settings = dict(dtype="float32", threads=2, block_size=4, max_num_seqs=8, max_num_batched_tokens=16)
    ref = LLM(str(tiny_dir), kv_cache_bytes=1 << 16, **settings)
    q8 = LLM(str(tiny_dir), kv_cache_bytes=1 << 16, kv_cache_dtype="int8", **settings)
    assert q8.engine.kv_pool.dtype == torch.int8 and q8.engine.kv_dtype_name == "int8"
    assert q8.engine.block_manager.num_blocks > 1.7 * ref.engine.block_manager.num_blocks
    tokens = list(range(5, 60))
    a, b = ref.engine.prompt_logits(tokens, chunk=1), q8.engine.prompt_logits(tokens, chunk=1)
    tv = (a.softmax(-1) - b.softmax(-1)).abs().sum(-1) / 2  # total variation distance per position
    assert tv.max() < 0.05 and tv.mean() < 0.02  # measured 0.026 and 0.010
    small = LLM(str(tiny_dir), num_kv_blocks=24, kv_cache_dtype="int8", **settings)
    prompts = [list(range(10 * i, 10 * i + 12)) for i in range(6)] + [list(range(10, 22))]
    results = small.generate([{"prompt_token_ids": p} for p in prompts],
                             SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert all(len(r.token_ids) == 16 for r in results)
    assert any(r.metrics["num_preemptions"] > 0 for r in results)


def test_auto_kv_cache_dtype(tiny_dir):
    # bf16 rows unless float32 compute is asked for by name, whatever compute dtype the CPU gets by default.
    settings = dict(threads=2, block_size=4, num_kv_blocks=16)
    assert LLM(str(tiny_dir), **settings).engine.kv_pool.dtype == torch.bfloat16
    assert LLM(str(tiny_dir), dtype="bfloat16", **settings).engine.kv_pool.dtype == torch.bfloat16
    assert LLM(str(tiny_dir), dtype="float32", **settings).engine.kv_pool.dtype == torch.float32
    assert LLM(str(tiny_dir), dtype="float32", kv_cache_dtype="bfloat16", **settings).engine.kv_dtype_name == "bfloat16"


def test_bad_kv_cache_dtype_is_refused(tiny_dir):
    with pytest.raises(Exception, match="kv_cache_dtype 'int4' is not supported"):
        LLM(str(tiny_dir), kv_cache_dtype="int4")


def test_bound_submodules_follow_replacement():
    """bind_submodules gives children plain attributes; replacing a child must not leave the old one reachable."""
    from torch import nn

    from ironlm.layers.module import Module, bind_submodules

    class Block(Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    block = Block()
    bind_submodules(block)
    assert block.__dict__["proj"] is block._modules["proj"]
    replacement = nn.Identity()
    block.set_submodule("proj", replacement)
    assert block.proj is replacement and block._modules["proj"] is replacement
    x = torch.randn(2, 4)
    assert torch.equal(block(x), x)
