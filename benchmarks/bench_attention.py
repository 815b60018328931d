"""GB/s of K/V read by ironlm's paged decode attention kernel.

    python benchmarks/bench_attention.py [--threads 2]

Two kinds of case. "batched": many sequences with long contexts, one call, the KV far larger than the
L3 cache. "cold, 24 layers": one sequence, a call per layer over 24 separate caches (as a decode step
makes), so each layer's KV comes from memory as in a real model. Random K/V: speed does not depend on values.
"""

import argparse
import time

from ironlm import kernels  # before torch: ironlm sets OpenMP's wait policy

import torch

# (name, query heads, kv heads, head_dim, sequences, context tokens, layers)
CASES = [
    ("135M shape, batched", 9, 3, 64, 64, 1600, 1),
    ("1.7B shape, batched", 32, 32, 64, 16, 1600, 1),
    ("135M shape, cold, 24 layers", 9, 3, 64, 1, 600, 24),
    ("1.7B shape, cold, 24 layers", 32, 32, 64, 1, 600, 24),
    ("Llama-3-8B heads, cold, 24 layers", 32, 8, 128, 1, 600, 24),
]
BLOCK_SIZE = 16


def run_case(heads: int, kv_heads: int, head_dim: int, batch: int, ctx: int, layers: int, repeats: int) -> float:
    """Best seconds for one pass over all layers."""
    blocks_per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    caches = [(torch.randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim).bfloat16(),
               torch.randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim).bfloat16()) for _ in range(layers)]
    tables = torch.randperm(num_blocks).to(torch.int32).reshape(batch, blocks_per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim).bfloat16()
    scale = head_dim ** -0.5
    best = float("inf")
    for _ in range(repeats + 1):  # the first sweep warms up
        start = time.perf_counter()
        for k, v in caches:
            kernels.paged_attention_decode(q, k, v, tables, lens, scale)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    kernels.set_num_threads(args.threads)
    print(f"isa={kernels.isa()[0]} threads={args.threads}; bf16 KV, block size {BLOCK_SIZE}; GB/s = K+V bytes / time")
    print(f"{'case':36} {'H':>3} {'KVH':>3} {'D':>4} {'seqs':>4} {'ctx':>5} {'ms':>8} {'GB/s':>6}")
    for name, heads, kv_heads, head_dim, batch, ctx, layers in CASES:
        seconds = run_case(heads, kv_heads, head_dim, batch, ctx, layers, args.repeats)
        kv_bytes = layers * batch * ctx * kv_heads * head_dim * 2 * 2
        print(f"{name:36} {heads:>3} {kv_heads:>3} {head_dim:>4} {batch:>4} {ctx:>5} {seconds * 1e3:>8.2f} "
              f"{kv_bytes / seconds / 1e9:>6.1f}")


if __name__ == "__main__":
    main()
