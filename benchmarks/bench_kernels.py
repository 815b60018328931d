"""GB/s of weights read by ironlm's GEMM per format, against PyTorch's own CPU kernels.

    python benchmarks/bench_kernels.py [--threads 2] [--rows 1 8 32] [--shapes decode|1.7b|all]
    python benchmarks/bench_kernels.py --interference   # our pool next to PyTorch's OpenMP pool

Each case cycles through enough copies of the weight to exceed the L3 cache, so the numbers
are memory-bound like real decode. Weight bytes include scales. Random weights: speed does not
depend on values.
"""

import argparse
import time

from ironlm import _kernels  # before torch: ironlm sets OpenMP's wait policy, as it does for users
from ironlm import hardware
from ironlm.quant import QuantLinear

import torch

SHAPES = {  # name: (N, K)
    "decode": [(2048, 2048), (8192, 2048)],
    "1.7b": [(6144, 2048), (2048, 2048), (16384, 2048), (2048, 8192)],  # qkv, o, gate_up, down
}
# Twice the last-level cache (at least 96 MB): an Intel Xeon guest here had a 260 MiB L3.
CACHE_BYTES = max(96 << 20, 2 * (hardware.last_level_cache_bytes() or 0))


def timed(fn, layers, x, repeats: int) -> float:
    """Best seconds per call over `repeats` sweeps through all layers."""
    for layer in layers:
        fn(layer, x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in layers:
            fn(layer, x)
        best = min(best, (time.perf_counter() - start) / len(layers))
    return best


def torch_cases(w: torch.Tensor):
    """(name, bytes, make_layer, call) for PyTorch's kernels on one dense weight (N, K)."""
    n, k = w.shape
    yield "torch bf16 linear", n * k * 2, lambda: w.bfloat16(), lambda wb, x: torch.nn.functional.linear(x, wb)

    def int8_layer():
        scale = w.abs().amax(dim=1) / 127
        q = torch.round(w / scale[:, None]).to(torch.int8)
        return q, scale.bfloat16()

    yield "torch _weight_int8pack_mm", n * k + 2 * n, int8_layer, lambda l, x: torch._weight_int8pack_mm(x, l[0], l[1])

    def int4_layer():
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        scales_zeros = torch.rand(k // 32, n, 2, dtype=torch.bfloat16)
        return packed, scales_zeros

    yield ("torch _weight_int4pack_mm_for_cpu", n * k // 2 + (k // 32) * n * 4, int4_layer,
           lambda l, x: torch._weight_int4pack_mm_for_cpu(x, l[0], 32, l[1]))


def interference(threads: int, repeats: int) -> None:
    """Does our thread pool fight PyTorch's OpenMP pool? Time a decode-shaped int4 GEMM alone,
    a small torch matmul (which wakes the OpenMP threads) alone, and the two interleaved."""
    w = torch.randn(8192, 2048)
    layers = [QuantLinear.from_dense(w, None, "int4") for _ in range(8)]
    x = torch.randn(1, 2048).bfloat16()
    a = torch.randn(192, 192)

    def ours():
        for layer in layers:
            layer(x)

    def theirs():
        for _ in layers:
            a @ a

    def both():
        for layer in layers:
            a @ a
            layer(x)

    alone_ours, alone_torch, mixed = (timed(lambda f, _: f(), [f], None, repeats) / len(layers) * 1e6
                                      for f in (ours, theirs, both))
    print(f"threads={threads}: ironlm int4 GEMM {alone_ours:.0f} us, torch 192x192 mm {alone_torch:.0f} us, "
          f"interleaved {mixed:.0f} us per pair (sum of the two alone: {alone_ours + alone_torch:.0f} us)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--shapes", choices=["decode", "1.7b", "all"], default="all")
    parser.add_argument("--formats", nargs="+", default=["int4_sym", "int4", "int8", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--interference", action="store_true", help="only measure our pool next to PyTorch's")
    args = parser.parse_args()
    _kernels.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    if args.interference:
        for _ in range(3):
            interference(args.threads, args.repeats)
        return
    shapes = SHAPES["decode"] + SHAPES["1.7b"] if args.shapes == "all" else SHAPES[args.shapes]
    print(f"isa={_kernels.active_isa()[0]} threads={args.threads}; x is bfloat16; GB/s = weight bytes / time")
    print(f"{'kernel':38} {'N':>6} {'K':>5} {'M':>3} {'us':>8} {'GB/s':>6} {'GFLOP/s':>8}")
    g = torch.Generator().manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, generator=g)
        cases = []
        for fmt in args.formats:
            layer = QuantLinear.from_dense(w, None, fmt)
            cases.append((f"ironlm {fmt} ({layer.kernel.split(':')[0]})", layer.nbytes,
                          lambda layer=layer: QuantLinear(layer.packed.clone(), layer.fmt, k, n),
                          lambda l, x: l(x)))
        if not args.no_torch:
            cases.extend(torch_cases(w))
        for name, nbytes, make, call in cases:
            layers = [make() for _ in range(max(2, CACHE_BYTES // nbytes + 1))]
            for m in args.rows:
                x = torch.randn(m, k, generator=g).bfloat16()
                dt = timed(call, layers, x, args.repeats)
                print(f"{name:38} {n:6} {k:5} {m:3} {dt * 1e6:8.0f} {nbytes / dt / 1e9:6.1f} {2 * m * n * k / dt / 1e9:8.0f}",
                      flush=True)
            del layers


if __name__ == "__main__":
    main()
