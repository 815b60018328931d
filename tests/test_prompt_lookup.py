"""Prompt lookup (speculative decoding from the text itself): the drafts proposed, the drafts kept, and an engine
whose answers do not change with it."""
import json
import random

import pytest
import torch

from ironlm import LLM, SamplingParams
from ironlm.engine.lookup import MAX_NGRAM, MIN_NGRAM, LookupIndex
from ironlm.engine.model_runner import verify_drafts
from ironlm.errors import IronlmError
from ironlm.sampling import SampleResult


def brute_force(token_ids: list[int], k: int) -> list[int]:
    """The continuation of the latest earlier occurrence of the longest tail, searched for directly."""
    for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
        tail = token_ids[-n:]
        for end in range(len(token_ids) - 1, n - 1, -1):
            if len(token_ids) > n and token_ids[end - n:end] == tail:
                return token_ids[end:end + k]
    return []


def test_lookup_finds_the_latest_longest_match_as_the_text_grows():
    index = LookupIndex()
    assert index.propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3], 2) == [7, 5]  # "2 3" last came before "7 5"
    assert LookupIndex().propose([4, 1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3) == [7, 5, 1]  # the latest "1 2 3"
    assert LookupIndex().propose([5, 6, 7, 8], 4) == []
    assert LookupIndex().propose([3, 3], 4) == []  # the tail itself is no earlier occurrence
    rng = random.Random(0)
    for _ in range(200):  # grown a few tokens at a time, as a sequence decodes, it answers as a fresh search
        tokens, index = [rng.randrange(4)], LookupIndex()
        for _ in range(30):
            tokens += [rng.randrange(4) for _ in range(rng.randint(1, 3))]
            assert index.propose(tokens, 3) == brute_force(tokens, 3)


def test_drafts_are_kept_while_the_model_agrees():
    def results(*ids):
        return [SampleResult(i) for i in ids]

    assert [r.token_id for r in verify_drafts([5, 6, 7], results(5, 6, 7, 8))] == [5, 6, 7, 8]  # all kept, and one
    assert [r.token_id for r in verify_drafts([5, 6, 7], results(5, 9, 7, 8))] == [5, 9]  # the model's own token
    assert [r.token_id for r in verify_drafts([5], results(4, 5))] == [4]
    assert [r.token_id for r in verify_drafts([], results(3))] == [3]


SHARPNESS = 3.0  # sharp enough to loop, soft enough that penalties change the answer


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory, hf_tokenizer_dir):
    """A tiny random Llama with sharp distributions. Random models fall into loops, which prompt lookup then
    drafts."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPNESS)
    directory = tmp_path_factory.mktemp("peaked")
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((hf_tokenizer_dir / name).read_bytes())
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    return directory


PROMPTS = [{"prompt_token_ids": [random.Random(i).randrange(1, 512) for _ in range(n)]}
           for i, n in enumerate([5, 40, 17, 90])]


def run(directory, prompt_lookup: int, params: list[SamplingParams]):
    # float32 through torch's matmuls: bf16 rounds a few-row step of verification apart from a one-row step enough
    # to flip a near tie (it does on the real model), and the comparison is of the engine's logic
    llm = LLM(model=str(directory), prompt_lookup=prompt_lookup, max_model_len=256, max_num_batched_tokens=128,
              dtype="float32", quant="none")
    sampler, histories = llm.engine.runner.sampler, []

    def recording(logits, states, writable=False):  # each row's output so far, per sequence (its prompt list)
        histories.append([(id(s.prompt_token_ids), list(s.output_token_ids)) for s in states])
        return sampler(logits, states, writable)

    llm.engine.runner.sampler = recording
    results = llm.generate(PROMPTS, params)
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.lookups
    # a sequence's rows in one step: each samples after the drafts before it, which penalties read
    for rows in histories:
        for (a, first), (b, second) in zip(rows, rows[1:]):
            assert a != b or second[:-1] == first
    return results, engine.stats()


def test_greedy_answers_do_not_change(peaked_model):
    params = [SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=33, temperature=0, presence_penalty=1.5, frequency_penalty=1.0,
                             logit_bias={7: 5.0}),  # penalties read the drafts before each row
              SamplingParams(max_tokens=50, temperature=0, logprobs=2),
              SamplingParams(max_tokens=45, temperature=0, repetition_penalty=1.2)]  # drafts seen for their row only
    plain, plain_stats = run(peaked_model, 0, params)
    drafted, stats = run(peaked_model, 8, params)
    for a, b in zip(plain, drafted):
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
    assert [len(r.token_ids) for r in drafted] == [60, 33, 50, 45]
    assert plain_stats["num_draft_tokens"] == 0 and stats["num_draft_tokens"] > stats["num_kept_draft_tokens"] > 5
    assert stats["num_steps"] < plain_stats["num_steps"]  # the same tokens in fewer steps


def test_a_stop_among_the_drafts_kept_ends_the_answer_there(peaked_model):
    greedy = SamplingParams(max_tokens=60, temperature=0)
    plain, _ = run(peaked_model, 0, [greedy] * 4)
    stops = [SamplingParams(max_tokens=60, temperature=0, stop_token_ids=[r.token_ids[30]]) for r in plain]
    plain, _ = run(peaked_model, 0, stops)
    drafted, _ = run(peaked_model, 6, stops)
    for a, b in zip(plain, drafted):
        assert a.token_ids == b.token_ids and b.finish_reason == "stop" and len(b.token_ids) <= 31


def test_a_seed_gives_the_same_answer_with_drafts_or_without(peaked_model):
    params = [SamplingParams(max_tokens=40, temperature=0.8, seed=i, logprobs=1) for i in range(4)]
    plain, _ = run(peaked_model, 0, params)
    drafted, stats = run(peaked_model, 5, params)
    assert [r.token_ids for r in drafted] == [r.token_ids for r in plain] and stats["num_kept_draft_tokens"] > 5
    assert all(len(r.token_ids) == 40 and r.finish_reason == "length" for r in drafted)


def test_prompt_lookup_setting_is_checked():
    with pytest.raises(IronlmError, match="prompt_lookup"):
        LLM(prompt_lookup=-1)


def test_drafted_rows_run_through_decode_graphs(gguf_path):
    """A step of a sequence's next token and its drafts, replayed as a graph of one-token rows, computes what the
    same step computes from Python, what one-token steps compute and what a prefill of the whole text computes at
    those positions. (The real model: the tiny random ones give every row the same final hidden state.)"""
    from ironlm.engine.sequence import Sequence

    llm = LLM(model=str(gguf_path), max_model_len=256)  # its own kernels: steps replay as graphs
    engine, runner = llm.engine, llm.engine.runner
    tokens = llm.tokenizer.encode("The river rises in the hills to the north of the town, where a dozen small "
                                  "streams run together among the pine woods.")
    seq = Sequence("x", tokens, SamplingParams())
    engine.block_manager.append_slots(seq, len(tokens))
    start = len(tokens) - 5  # the last 5: the next token and 4 drafts
    runner._forward([(seq, start)])
    seq.num_computed_tokens = start
    step = ([(seq, 5)], {"x": 4})
    graphed = runner._forward(*step)[0].float().clone()
    assert 5 in runner.graphs
    singles = []
    for position in range(start, start + 5):
        seq.num_computed_tokens = position
        singles.append(runner._forward([(seq, 1)])[0].float().clone())
    runner.graphs = None
    seq.num_computed_tokens = start
    eager = runner._forward(*step)[0].float()
    seq.num_computed_tokens = 0
    whole = runner._forward([(seq, len(tokens))])[0][-5:].float()
    def error(a, b):  # per row, relative to the row's size: bf16 rounds large states by whole units
        return ((a - b).norm(dim=-1) / b.norm(dim=-1)).amax().item()

    assert error(graphed, torch.cat(singles)) < 0.01  # the same kernels, row by row
    assert error(graphed, eager) < 0.08 and error(graphed, whole) < 0.08  # 0.03 here; 0.2 if rows saw later ones
    assert error(graphed[1:], graphed[:-1]) > 0.5  # the rows differ: each saw its own tokens
