"""Decode steps recorded as kernel graphs and replayed from C++: the same tokens as running them from Python,
checks that still run on every replay, and the cases a graph must refuse."""
import dataclasses

import pytest
import torch

from ironlm import LLM, SamplingParams, _kernels, kernels
from ironlm.engine.decode_graph import DecodeGraph, _Arena


def rope_tables(positions: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), torch.rand(half))
    return angles.cos().contiguous(), angles.sin().contiguous()


def test_replay_reads_the_buffers_as_they_are_then():
    cos, sin = rope_tables(32, 8)
    q, k = torch.randn(2, 3, 16), torch.randn(2, 1, 16)
    positions = torch.tensor([1, 2])
    graph = _kernels.KernelGraph()
    graph.begin_capture()
    kernels.apply_rope(q, k, positions, cos, sin)  # runs now and is recorded
    graph.end_capture()
    assert len(graph) == 1

    q0, k0 = torch.randn(2, 3, 16), torch.randn(2, 1, 16)
    q.copy_(q0), k.copy_(k0)
    positions.copy_(torch.tensor([7, 30]))
    graph.replay()
    q_ref, k_ref = q0.clone(), k0.clone()
    kernels.apply_rope(q_ref, k_ref, torch.tensor([7, 30]), cos, sin)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


def test_replay_checks_every_call_before_running_any():
    cos, sin = rope_tables(32, 8)
    gate_up, out = torch.randn(2, 32), torch.empty(2, 16)
    q, k = torch.randn(2, 3, 16), torch.randn(2, 1, 16)
    positions = torch.tensor([1, 2])
    graph = _kernels.KernelGraph()
    graph.begin_capture()
    kernels.silu_mul(gate_up)  # an allocation of its own; what matters is the write below
    _kernels.silu_mul(2, 16, gate_up.data_ptr(), 32, False, out.data_ptr(), 16, False)
    kernels.apply_rope(q, k, positions, cos, sin)
    graph.end_capture()

    out.fill_(7.0)
    q_before = q.clone()
    positions[1] = 32  # past the cos/sin cache
    with pytest.raises(ValueError, match="rope: position outside the cos/sin cache"):
        graph.replay()
    assert torch.all(out == 7.0), "the silu_mul recorded before the bad rope call must not have run"
    assert torch.equal(q, q_before)


def test_capture_misuse_is_refused():
    graph = _kernels.KernelGraph()
    with pytest.raises(RuntimeError, match="before the capture has ended"):
        graph.replay()
    graph.begin_capture()
    other = _kernels.KernelGraph()
    with pytest.raises(RuntimeError, match="already capturing"):
        other.begin_capture()
    w = torch.randn(64, 32)
    with pytest.raises(ValueError, match="not recordable"):
        _kernels.quantize_pack(0, w.data_ptr(), 32, False, 64, 32, torch.empty(4096, dtype=torch.uint8).data_ptr())
    graph.end_capture()
    with pytest.raises(RuntimeError, match="already captured"):
        graph.begin_capture()
    with pytest.raises(RuntimeError, match="not capturing"):
        other.end_capture()


def test_arena_reuses_blocks_only_when_no_view_is_left():
    arena = _Arena()
    with arena:
        first = torch.empty(4, 8)
        view = first[1:]          # keeps first's block in use after first is gone
        del first
        second = torch.empty(4, 8)
        assert second.data_ptr() != view.untyped_storage().data_ptr()
        del view
        third = torch.empty(2, 8)  # fits in the freed block
        assert third.untyped_storage().data_ptr() in arena.by_address
        for _ in range(10):       # temporaries that die at once: one new block, used by each in turn
            torch.empty(4, 8)
    assert len(arena.blocks) == 3
    assert arena.refused is None


def test_arena_refuses_ops_that_compute():
    arena = _Arena()
    x = torch.randn(4)
    with arena:
        x.view(2, 2)              # a view: fine
        x.reshape(2, 2)           # a reshape that is a view: fine
    assert arena.refused is None
    with arena:
        torch.randn(4, 4).t().reshape(16)  # a reshape that must copy
    assert arena.refused is not None
    arena = _Arena()
    with arena:
        x + 1
    assert arena.refused == "aten.add.Tensor"
    arena = _Arena()
    with arena:
        torch.empty_like(x)  # memory the arena does not serve: a replay could write into it after it is freed
    assert arena.refused == "aten.empty_like.default"


@pytest.fixture(scope="module")
def tiny_llama(make_tiny_model):
    return make_tiny_model("llama")[0]


PROMPTS = [list(range(3, 40)), [7, 8, 9], list(range(200, 221)), list(range(60, 75)), [5]]
# Different lengths: sequences finish at different steps, so the batch shrinks through 5, 4, 3, 2, 1.
PARAMS = [SamplingParams(max_tokens=6 + 5 * i, temperature=0.0, ignore_eos=True) for i in range(len(PROMPTS))]


def generate(directory, params=PARAMS, **settings) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(directory), threads=2, block_size=4, num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=16,
              **settings)
    results = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [r.token_ids for r in results], llm


# A float32 checkpoint at float32 compute runs torch's matmuls unless a quant is asked for (README).
@pytest.mark.parametrize("dtype,quant,kv", [("float32", "int8", "auto"), ("bfloat16", "auto", "bfloat16"),
                                            ("float32", "int4", "int8")])
@pytest.mark.parametrize("lookup", [0, 4])
def test_graph_decoding_gives_the_tokens_of_python_decoding(tiny_llama, dtype, quant, kv, lookup):
    # with prompt-lookup drafts, a sequence takes a graph row per token; answers long enough to repeat themselves
    params = [dataclasses.replace(p, max_tokens=p.max_tokens + 40) for p in PARAMS] if lookup else PARAMS
    eager, llm = generate(tiny_llama, params, dtype=dtype, quant=quant, kv_cache_dtype=kv, enforce_eager=True,
                          prompt_lookup=lookup)
    assert llm.engine.runner.graphs is None
    replayed, llm = generate(tiny_llama, params, dtype=dtype, quant=quant, kv_cache_dtype=kv, prompt_lookup=lookup)
    assert replayed == eager
    if lookup:
        assert llm.engine.num_draft_tokens > 0 and max(llm.engine.runner.graphs) > len(PROMPTS)
    else:
        assert sorted(llm.engine.runner.graphs) == [1, 2, 3, 4, 5]  # one graph per batch size, each replayed


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_graph_decoding_of_other_families(make_tiny_model, arch):
    directory, _ = make_tiny_model(arch)
    eager, _ = generate(directory, dtype="float32", quant="int8", enforce_eager=True)
    replayed, llm = generate(directory, dtype="float32", quant="int8")
    assert replayed == eager
    assert llm.engine.runner.graphs


def test_graph_output_equals_python_output_exactly(isa, tiny_llama):
    # The hidden states themselves, not only the argmax: the replay runs the same kernels on the same data.
    llm = LLM(str(tiny_llama), dtype="float32", quant="int8", threads=2, block_size=4, num_kv_blocks=64)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seq_tokens = llm.generate({"prompt_token_ids": list(range(10, 30))}, params)[0].token_ids
    runner = llm.engine.runner
    [graph] = runner.graphs.values()
    # Replay the last step again by hand and run the same step from Python: same rows, bit for bit.
    embedded = graph.input.clone()  # the step adds into its input buffer: the residual stream starts there
    replayed = graph.replay().clone()
    from_python = runner.model.forward_embedded(embedded, graph.positions.clone(), graph.metadata())
    assert torch.equal(replayed, from_python)
    assert len(seq_tokens) == 12


def test_models_a_graph_cannot_record_stay_in_python(make_tiny_model, tiny_llama):
    # Mistral's sliding window gathers its keys with torch ops; quant none runs torch's matmuls.
    directory, _ = make_tiny_model("mistral")
    eager, _ = generate(directory, dtype="float32", quant="int8", enforce_eager=True)
    tried, llm = generate(directory, dtype="float32", quant="int8")
    assert tried == eager and llm.engine.runner.graphs is None
    eager, _ = generate(tiny_llama, dtype="float32", quant="none", enforce_eager=True)
    tried, llm = generate(tiny_llama, dtype="float32", quant="none")
    assert tried == eager and llm.engine.runner.graphs is None


def test_graph_memory_is_the_peak_not_the_sum(make_tiny_model):
    # Eight layers allocate eight times what one does; the arena holds about one layer's live tensors.
    directory, _ = make_tiny_model("llama", num_hidden_layers=8)
    _, llm = generate(directory, dtype="float32", quant="int8")
    graph: DecodeGraph = llm.engine.runner.graphs[1]
    per_layer = 4 * (64 + 128 + 64 + 64 + 256 + 128 + 64)  # float32 bytes a layer allocates for one token
    assert len(graph.graph) == 8 * 10 + 1  # ten kernel calls a layer and the final norm
    assert graph.arena.nbytes < 2 * per_layer


def test_batches_past_the_graph_limit_run_in_python(tiny_llama):
    from ironlm.engine.model_runner import MAX_GRAPH_BATCH

    prompts = [{"prompt_token_ids": [3 + i, 40 + i, 90]} for i in range(MAX_GRAPH_BATCH + 2)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    results = {}
    for eager in (True, False):
        llm = LLM(str(tiny_llama), dtype="float32", quant="int8", threads=2, max_num_seqs=64,
                  max_num_batched_tokens=256, enforce_eager=eager)
        results[eager] = [r.token_ids for r in llm.generate(prompts, params)]
    assert results[True] == results[False]
    assert llm.engine.runner.graphs == {}  # every step had more sequences than graphs are made for


def test_preemption_with_graphs_gives_the_tokens_of_python(tiny_llama):
    # Too few blocks for every sequence: some are preempted, their blocks handed to others and recomputed later,
    # so graphs replay over block tables that change between steps; then the same engine runs two prompts again.
    prompts = [{"prompt_token_ids": list(range(10 * i, 10 * i + 12))} for i in range(6)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    runs = {}
    for eager in (True, False):
        llm = LLM(str(tiny_llama), dtype="float32", quant="int8", threads=2, block_size=4, num_kv_blocks=24,
                  max_num_seqs=8, max_num_batched_tokens=64, enforce_eager=eager)
        results = llm.generate(prompts, params)
        assert any(r.metrics["num_preemptions"] > 0 for r in results)
        again = llm.generate(prompts[:2], params)
        runs[eager] = [r.token_ids for r in results + again]
    assert runs[False] == runs[True]
    assert llm.engine.runner.graphs
