"""Where one decode step's time goes: GEMMs, decode attention, KV writes, norms, rope, SiLU, and the rest.

    python benchmarks/profile_decode.py [MODEL] [--prompt-tokens 512] [--new-tokens 64] [--batch 1] [--threads 2]

Runs --batch sequences (prompts of token ids, then greedy decoding with EOS ignored) and wraps each kernel
entry point with a timer that counts only the steps in which every sequence decodes one token. The wrappers
cost a microsecond or two a call, so "rest" is slightly overstated.
"""

import argparse
import time
from collections import defaultdict

from ironlm import LLM, SamplingParams  # before torch: ironlm sets OpenMP's wait policy
from ironlm.layers import activation, attention, norm, rotary
from ironlm.quant import linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="GGUF or HF directory (default: the embedded 135M)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    llm = LLM(model=args.model, threads=args.threads, max_num_seqs=max(64, args.batch))
    params = SamplingParams(max_tokens=args.new_tokens + 1, ignore_eos=True, temperature=0)

    def prompts(base: int) -> list[dict]:
        return [{"prompt_token_ids": list(range(base + 7 * i, base + 7 * i + args.prompt_tokens))}
                for i in range(args.batch)]

    llm.generate(prompts(1000), params)  # warm-up

    # Only steps in which every sequence decodes one token count: not prefill chunks, not mixed steps.
    spent: dict[str, float] = defaultdict(float)
    counting = [False]
    runner = llm.engine.runner
    execute = runner.execute

    def timed_step(scheduled):
        counting[0] = len(scheduled) == args.batch and all(n == 1 for _, n in scheduled)
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

    runner.execute = timed_step
    linear.QuantLinear.forward = timed(linear.QuantLinear.forward, "gemm")
    for module, name, key in [(attention.kernels, "paged_attention_decode", "attention"),
                              (attention.kernels, "write_kv", "write_kv"), (norm.kernels, "add_rms_norm", "norm"),
                              (rotary.kernels, "apply_rope", "rope"), (activation.kernels, "silu_mul", "silu_mul")]:
        setattr(module, name, timed(getattr(module, name), key))

    llm.generate(prompts(2000), params)
    steps = int(spent["steps"])
    step_ms = spent["step"] / steps * 1e3
    print(f"batch {args.batch}: {steps} decode steps, {step_ms:.2f} ms a step ({args.batch / step_ms * 1e3:.1f} tok/s) "
          f"after {args.prompt_tokens}-token prompts:")
    accounted = 0.0
    for key in ("gemm", "attention", "write_kv", "norm", "rope", "silu_mul"):
        ms = spent[key] / steps * 1e3
        accounted += ms
        print(f"  {key:10} {ms:6.2f} ms")
    print(f"  {'rest':10} {step_ms - accounted:6.2f} ms  (Python, sampling; scheduling and detokenizing not included)")


if __name__ == "__main__":
    main()
