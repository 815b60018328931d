"""Where one decode step's time goes: GEMMs, decode attention, KV writes, norms, rope, SiLU, and the rest.

    python benchmarks/profile_decode.py [MODEL] [--prompt-tokens 512] [--new-tokens 64] [--batch 1] [--threads 2]
    python benchmarks/profile_decode.py MODEL --batch 16 --prompt-tokens 1500 --new-tokens 128 --all-steps

Runs --batch sequences (prompts of token ids, then greedy decoding with EOS ignored) and wraps each kernel
entry point with a timer that counts only the steps in which every sequence decodes one token. With
--all-steps it counts every step instead (prompt chunks, mixed and decode steps): where a bulk job's time goes.
The wrappers cost a microsecond or two a call, so "rest" is slightly overstated. The page faults and system
time of the measured run are printed too: what the memory allocator costs (ironlm/engine/llm_engine.py).

Decode steps replay their recorded kernel calls from C++ (ironlm/engine/decode_graph.py), out of the wrappers'
sight: their time shows as "graph" (every kernel of the step but the lm_head). --enforce-eager runs them from
Python instead, for the per-kernel split (with Python's per-call costs in it).
"""

import argparse
import resource
import time
from collections import defaultdict

from ironlm import LLM, SamplingParams  # before torch: ironlm sets OpenMP's wait policy
from ironlm.cli import memory_size
from ironlm.engine import decode_graph
from ironlm.layers import activation, attention, norm, rotary
from ironlm.quant import linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="GGUF or HF directory (default: the embedded 135M)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--all-steps", action="store_true", help="count every step, not only all-decode ones")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--kv-cache-memory", type=memory_size, metavar="SIZE",
                        help="the KV cache's memory bound, e.g. 2G (default: ironlm's)")
    parser.add_argument("--enforce-eager", action="store_true", help="decode from Python: the per-kernel split")
    parser.add_argument("--gemm-shapes", action="store_true", help="split the GEMM time by weight shape and rows")
    args = parser.parse_args()

    llm = LLM(model=args.model, threads=args.threads, max_num_seqs=max(64, args.batch),
              kv_cache_dtype=args.kv_cache_dtype, kv_cache_bytes=args.kv_cache_memory, enforce_eager=args.enforce_eager,
              prompt_lookup=0)  # one token a step: the step being profiled
    params = SamplingParams(max_tokens=args.new_tokens + 1, ignore_eos=True, temperature=0)

    def prompts(base: int) -> list[dict]:
        return [{"prompt_token_ids": list(range(base + 7 * i, base + 7 * i + args.prompt_tokens))}
                for i in range(args.batch)]

    # Warm-up: the same batch, so the measured decode steps find their KV pages already mapped; a short one for
    # --all-steps, whose job pays that once as a real one does.
    llm.generate(prompts(1000)[:4] if args.all_steps else prompts(1000), params)

    # Only steps in which every sequence decodes one token count: not prefill chunks, not mixed steps.
    spent: dict[str, float] = defaultdict(float)
    counting = [False]
    runner = llm.engine.runner
    execute = runner.execute

    def timed_step(scheduled):
        counting[0] = args.all_steps or (len(scheduled) == args.batch and all(n == 1 for _, n in scheduled))
        start = time.perf_counter()
        out = execute(scheduled)
        if counting[0]:
            spent["step"] += time.perf_counter() - start
            spent["steps"] += 1
        counting[0] = False
        return out

    def timed(fn, key):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            if counting[0]:
                spent[key] += time.perf_counter() - start
            return out
        return wrapper

    by_shape: dict[tuple[int, int, str], list[float]] = defaultdict(lambda: [0.0, 0])  # seconds, calls

    def timed_gemm(layer, x, *a, **k):
        start = time.perf_counter()
        out = gemm(layer, x, *a, **k)
        if counting[0]:
            seconds = time.perf_counter() - start
            spent["gemm"] += seconds
            rows = x.numel() // layer.in_features
            entry = by_shape[(layer.out_features, layer.in_features, "> 64 rows" if rows > 64 else "<= 64 rows")]
            entry[0] += seconds
            entry[1] += 1
        return out

    runner.execute = timed_step
    decode_graph.DecodeGraph.replay = timed(decode_graph.DecodeGraph.replay, "graph")
    gemm = linear.QuantLinear.forward
    linear.QuantLinear.forward = timed_gemm
    for module, name, key in [(attention.kernels, "paged_attention_decode", "attention"),
                              (attention.kernels, "prefill_attention", "prefill_attn"),
                              (attention.kernels, "prefill_attention_paged", "prefill_attn"),
                              (attention.kernels, "write_kv", "write_kv"), (norm.kernels, "add_rms_norm", "norm"),
                              (rotary.kernels, "apply_rope", "rope"), (activation.kernels, "silu_mul", "silu_mul")]:
        setattr(module, name, timed(getattr(module, name), key))

    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    outputs = llm.generate(prompts(2000), params)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    steps = int(spent["steps"])
    if steps == 0:
        print("no step had every sequence decoding: the first sequences finished while others were still in their "
              "prompts; give more --new-tokens, or use --all-steps")
        return
    step_ms = spent["step"] / steps * 1e3
    if args.all_steps:
        print(f"{args.batch} sequences of {args.prompt_tokens} prompt + {args.new_tokens + 1} new tokens: {wall:.1f} s, "
              f"{steps} steps taking {spent['step']:.1f} s, of which:")
    else:
        print(f"batch {args.batch}: {steps} decode steps, {step_ms:.2f} ms a step "
              f"({args.batch / step_ms * 1e3:.1f} tok/s) after {args.prompt_tokens}-token prompts:")

    def amount(seconds: float) -> str:  # totals for a whole job, a step's share otherwise
        return f"{seconds:7.1f} s" if args.all_steps else f"{seconds / steps * 1e3:7.2f} ms"
    for key in ("graph", "gemm", "attention", "prefill_attn", "write_kv", "norm", "rope", "silu_mul"):
        print(f"  {key:12} {amount(spent[key])}")
    rest = spent["step"] - sum(spent[key] for key in spent if key not in ("step", "steps"))
    print(f"  {'rest':12} {amount(rest)}  (Python, sampling; scheduling and detokenizing not included)")
    if args.gemm_shapes:
        for (n, k, rows), (seconds, calls) in sorted(by_shape.items(), key=lambda item: -item[1][0]):
            print(f"    gemm {n:>6} x {k:<6} {rows:10} {amount(seconds)}  {calls:6} calls, "
                  f"{seconds / calls * 1e3:7.3f} ms a call")
    preempted = [o.metrics["num_preemptions"] for o in outputs]
    print(f"preemptions: {sum(preempted)} (in {sum(1 for p in preempted if p)} of {len(outputs)} sequences; each "
          f"recomputes its tokens so far), {llm.engine.block_manager.num_blocks} KV blocks of "
          f"{llm.engine.block_manager.block_size} tokens")
    print(f"page faults during the run: {after.ru_minflt - usage.ru_minflt:,} minor, "
          f"{after.ru_majflt - usage.ru_majflt:,} major; system time {after.ru_stime - usage.ru_stime:.2f} s")
    for batch, graph in sorted((runner.graphs or {}).items()):
        print(f"decode graph for {batch} sequences: {len(graph.graph)} kernel calls, "
              f"arena {graph.arena.nbytes / 1024:.1f} KB in {len(graph.arena.blocks)} blocks")


if __name__ == "__main__":
    main()
