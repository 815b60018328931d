"""Where one decode step's time goes: GEMMs, decode attention, KV writes, norms, rope, SiLU, and the rest.

    python benchmarks/profile_decode.py [MODEL] [--prompt-tokens 512] [--new-tokens 64] [--threads 2]

Runs one sequence (a prompt of token ids, then greedy decoding with EOS ignored) and wraps each kernel
entry point with a timer that counts one-row (decode) calls only. The wrappers cost a microsecond or two a
call, so "rest" (Python, sampling, scheduling) is slightly overstated.
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
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    llm = LLM(model=args.model, threads=args.threads)
    params = SamplingParams(max_tokens=args.new_tokens + 1, ignore_eos=True, temperature=0)
    llm.generate({"prompt_token_ids": list(range(1000, 1000 + args.prompt_tokens))}, params)  # warm-up

    spent: dict[str, float] = defaultdict(float)

    def timed(fn, key):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            rows = a[1] if key == "gemm" else a[0]  # QuantLinear.forward(self, x); the ops take x first
            if rows.shape[0] == 1:  # decode steps only, not the prompt's
                spent[key] += time.perf_counter() - start
            return out
        return wrapper

    linear.QuantLinear.forward = timed(linear.QuantLinear.forward, "gemm")
    for module, name, key in [(attention.kernels, "paged_attention_decode", "attention"),
                              (attention.kernels, "write_kv", "write_kv"), (norm.kernels, "add_rms_norm", "norm"),
                              (rotary.kernels, "apply_rope", "rope"), (activation.kernels, "silu_mul", "silu_mul")]:
        setattr(module, name, timed(getattr(module, name), key))

    [result] = llm.generate({"prompt_token_ids": list(range(2000, 2000 + args.prompt_tokens))}, params)
    decode_s = result.metrics["decode_s"]
    steps = args.new_tokens
    print(f"decode {steps / decode_s:.1f} tok/s, {decode_s / steps * 1e3:.2f} ms per token after a "
          f"{args.prompt_tokens}-token prompt:")
    accounted = 0.0
    for key in ("gemm", "attention", "write_kv", "norm", "rope", "silu_mul"):
        ms = spent[key] / steps * 1e3
        accounted += ms
        print(f"  {key:10} {ms:6.2f} ms")
    print(f"  {'rest':10} {decode_s / steps * 1e3 - accounted:6.2f} ms")


if __name__ == "__main__":
    main()
