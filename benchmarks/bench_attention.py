"""ironlm's attention kernels: GB/s of K/V read by paged decode attention, and GFLOP/s of prefill
attention against PyTorch's scaled_dot_product_attention.

    python benchmarks/bench_attention.py [--threads 2]

Decode, bf16 and int8 KV, two kinds of case. "batched": many sequences with long contexts, one call, the KV far larger than
the L3 cache. "cold, 24 layers": one sequence, a call per layer over 24 separate caches (as a decode step
makes), so each layer's KV comes from memory as in a real model. Prefill: one layer's causal attention of a
whole prompt, or of a chunk after cached tokens (SDPA then needs a mask), bf16. Random values: speed does
not depend on them.
"""

import argparse
import time

from ironlm import kernels  # before torch: ironlm sets OpenMP's wait policy

import torch
import torch.nn.functional as F

# (name, query heads, kv heads, head_dim, sequences, context tokens, layers)
CASES = [
    ("135M shape, batched", 9, 3, 64, 64, 1600, 1),
    ("1.7B shape, batched", 32, 32, 64, 16, 1600, 1),
    ("135M shape, cold, 24 layers", 9, 3, 64, 1, 600, 24),
    ("1.7B shape, cold, 24 layers", 32, 32, 64, 1, 600, 24),
    ("Llama-3-8B heads, cold, 24 layers", 32, 8, 128, 1, 600, 24),
]
BLOCK_SIZE = 16
# (name, query heads, kv heads, head_dim, new tokens, context tokens)
PREFILL_CASES = [
    ("135M shape, prompt of 512", 9, 3, 64, 512, 512),
    ("135M shape, prompt of 2048", 9, 3, 64, 2048, 2048),
    ("1.7B shape, prompt of 1500", 32, 32, 64, 1500, 1500),
    ("1.7B shape, 476 after 1024 cached", 32, 32, 64, 476, 1500),
    ("Llama-3-8B heads, prompt of 1024", 32, 8, 128, 1024, 1024),
]


def run_case(heads: int, kv_heads: int, head_dim: int, batch: int, ctx: int, layers: int, repeats: int,
             kv_dtype: torch.dtype = torch.bfloat16) -> float:
    """Best seconds for one pass over all layers."""
    blocks_per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, kv_heads, BLOCK_SIZE, head_dim)

    def cache() -> kernels.PagedCache:  # int8 rows come with a float scale each
        if kv_dtype is torch.int8:
            rows = [torch.randint(-127, 128, shape, dtype=torch.int8) for _ in range(2)]
            return kernels.PagedCache(*rows, *(torch.rand(shape[:3]) * 0.02 for _ in range(2)))
        return kernels.PagedCache(*(torch.randn(shape).to(kv_dtype) for _ in range(2)))
    caches = [cache() for _ in range(layers)]
    tables = torch.randperm(num_blocks).to(torch.int32).reshape(batch, blocks_per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim).bfloat16()
    scale = head_dim ** -0.5
    best = float("inf")
    for _ in range(repeats + 1):  # the first sweep warms up
        start = time.perf_counter()
        for layer_cache in caches:
            kernels.paged_attention_decode(q, layer_cache, tables, lens, scale)
        best = min(best, time.perf_counter() - start)
    return best


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_prefill_case(heads: int, kv_heads: int, head_dim: int, length: int, context: int,
                     repeats: int) -> tuple[float, float]:
    """Best seconds of (ironlm's kernel, PyTorch's SDPA) for one layer."""
    q = torch.randn(length, heads, head_dim).bfloat16()
    k = torch.randn(context, kv_heads, head_dim).bfloat16()
    v = torch.randn(context, kv_heads, head_dim).bfloat16()
    scale = head_dim ** -0.5
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, tokens, D)
    if length == context:
        def sdpa():
            F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = torch.arange(context).unsqueeze(0) <= torch.arange(context - length, context).unsqueeze(1)

        def sdpa():
            F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=True)
    ours = best_of(lambda: kernels.prefill_attention(q, k, v, scale), repeats)
    return ours, best_of(sdpa, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    kernels.set_num_threads(args.threads)
    print(f"isa={kernels.isa()[0]} threads={args.threads}; decode, block size {BLOCK_SIZE}; GB/s = K+V bytes / time "
          "(int8: rows and their scales)")
    print(f"{'case':36} {'H':>3} {'KVH':>3} {'D':>4} {'seqs':>4} {'ctx':>5} {'bf16 ms':>8} {'GB/s':>6} "
          f"{'int8 ms':>8} {'GB/s':>6}")
    for name, heads, kv_heads, head_dim, batch, ctx, layers in CASES:
        rows = layers * batch * ctx * kv_heads * 2  # K and V
        bf16 = run_case(heads, kv_heads, head_dim, batch, ctx, layers, args.repeats)
        int8 = run_case(heads, kv_heads, head_dim, batch, ctx, layers, args.repeats, torch.int8)
        print(f"{name:36} {heads:>3} {kv_heads:>3} {head_dim:>4} {batch:>4} {ctx:>5} {bf16 * 1e3:>8.2f} "
              f"{rows * head_dim * 2 / bf16 / 1e9:>6.1f} {int8 * 1e3:>8.2f} {rows * (head_dim + 4) / int8 / 1e9:>6.1f}")
    print()
    print("prefill, one layer, bf16; GFLOP/s counts the causal half of Q K^T and P V")
    print(f"{'case':36} {'H':>3} {'KVH':>3} {'D':>4} {'new':>5} {'ctx':>5} {'ironlm ms':>10} {'GFLOP/s':>8} "
          f"{'SDPA ms':>8} {'GFLOP/s':>8} {'speed-up':>8}")
    for name, heads, kv_heads, head_dim, length, context in PREFILL_CASES:
        ours, theirs = run_prefill_case(heads, kv_heads, head_dim, length, context, max(3, args.repeats // 3))
        pairs = length * (context - length) + length * (length + 1) / 2  # (query, visible key) pairs
        flop = 4 * pairs * head_dim * heads
        print(f"{name:36} {heads:>3} {kv_heads:>3} {head_dim:>4} {length:>5} {context:>5} {ours * 1e3:>10.2f} "
              f"{flop / ours / 1e9:>8.0f} {theirs * 1e3:>8.2f} {flop / theirs / 1e9:>8.0f} {theirs / ours:>7.2f}x")


if __name__ == "__main__":
    main()
