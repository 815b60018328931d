"""A/B two builds of ironlm's kernels in one process, alternating, best of several rounds each.

On a machine whose speed drifts between runs minutes apart (shared or virtual CPUs), two end-to-end runs cannot
tell a 10 % kernel change from the drift; two builds timed in turns within one process can. Keep a copy of the
old build's extension before rebuilding, then:

    cp "$(python -c 'import ironlm._kernels as k; print(k.__file__)')" /tmp/old_kernels.so
    # ... change csrc/, rebuild (pip install -e .) ...
    python benchmarks/ab_kernels.py /tmp/old_kernels.so prefill-attention
    python benchmarks/ab_kernels.py /tmp/old_kernels.so gemm --fmt int4_sym --rows 1,16 --shapes 6144x2048
    python benchmarks/ab_kernels.py /tmp/old_kernels.so sample --threads 1  # builds since 06d58c0 (its sampler)
    python benchmarks/ab_kernels.py /tmp/old_kernels.so decode-attention --threads 1 --cache-resident

Two ISA levels of the installed build compare the same way: name the old one instead of a file, and the new one
is the level in use (IRONLM_ISA):

    IRONLM_ISA=avx_vnni python benchmarks/ab_kernels.py avx2 gemm --fmt int8 --rows 1,16 --shapes 8192x2048

Calls of a few milliseconds, such as the sampler's, are best compared on one thread: with two, each build's
thread pool spins for a while after its calls, into the other build's turn, and two copies of one build measured
0.66-1.59x on this 2-core machine (1.00 +- 0.02x on one thread).

Outputs of the two builds are compared too (max abs difference; for sample, the rows whose picks differ), so a
change that should be exact shows it.
"""
import argparse
import importlib.machinery
import importlib.util
import time

import torch

from ironlm import _kernels as new_kernels
from ironlm import hardware
from ironlm.quant import QuantLinear
from ironlm.quant.formats import FORMAT_IDS


def load_old(path: str):
    """The old build's extension, under another name so that both builds live in one process."""
    # nanobind names the init function after the module, so the name stays _kernels (in another package).
    loader = importlib.machinery.ExtensionFileLoader("old_build._kernels", path)
    spec = importlib.util.spec_from_file_location("old_build._kernels", path, loader=loader)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as error:
        raise SystemExit(f"ab_kernels: cannot load {path} as ironlm's kernels ({error}); pass a copy of the old "
                         "build's _kernels*.so") from None
    if not hasattr(module, "gemm"):
        raise SystemExit(f"ab_kernels: {path} is not ironlm's kernels extension")
    return module


class AtLevel:
    """The installed build with its kernels switched to one ISA level for each call (set_isa is one store)."""

    def __init__(self, level: str):
        self.level = level

    def __getattr__(self, name: str):
        function = getattr(new_kernels, name)

        def call(*args):
            new_kernels.set_isa(self.level)
            return function(*args)

        return call


def best_of(builds: dict, run, rounds: int, round_seconds: float = 0.05) -> dict[str, float]:
    """Time run(name, module) for each build in turns; the best time of each, in seconds. A round repeats run
    enough times to last about round_seconds, so short kernels are not timed one call at a time."""
    start = time.perf_counter()
    for name, module in builds.items():
        run(name, module)  # warm-up: caches, pages, the thread pool
    repeats = max(1, int(round_seconds * len(builds) / (time.perf_counter() - start)))
    times = {name: [] for name in builds}
    for _ in range(rounds):
        for name, module in builds.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run(name, module)
            times[name].append((time.perf_counter() - start) / repeats)
    return {name: min(t) for name, t in times.items()}


def report(case: str, best: dict[str, float], unit_work: float | None, unit: str, diff: float) -> None:
    old, new = best["old"] * 1e3, best["new"] * 1e3
    rate = f"  ({unit_work / best['old'] / 1e9:6.1f} -> {unit_work / best['new'] / 1e9:6.1f} {unit})" if unit_work else ""
    print(f"{case:44} old {old:9.3f} ms  new {new:9.3f} ms  {best['old'] / best['new']:5.2f}x{rate}  max diff {diff:.1e}")


def ab_gemm(builds: dict, args) -> None:
    fmt_id = FORMAT_IDS[args.fmt]
    for rows in (int(r) for r in args.rows.split(",")):
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            # Copies of the weight filling twice the last-level cache, so decode shapes stream from memory as in
            # a model, not from cache.
            layer = QuantLinear.from_dense(torch.randn(n, k), None, args.fmt)
            beyond = max(64 << 20, 2 * (hardware.last_level_cache_bytes() or 0))
            copies = 1 if args.cache_resident else max(1, beyond // layer.packed.numel() // layer.packed.element_size())
            packed = [layer.packed] + [layer.packed.clone() for _ in range(copies - 1)]
            x = torch.randn(rows, k)
            outs = {name: torch.empty(rows, n) for name in builds}

            def run(name, module):
                y = outs[name]
                for w in packed:
                    module.gemm(fmt_id, w.data_ptr(), n, layer.k_padded, rows, k, x.data_ptr(), k, False,
                                y.data_ptr(), n, False, 0)

            best = best_of(builds, run, args.rounds)
            best = {name: t / copies for name, t in best.items()}
            diff = (outs["old"] - outs["new"]).abs().max().item()
            report(f"gemm {args.fmt} {rows} x {n}x{k}", best, 2 * rows * n * k, "G ops/s", diff)


def ab_prefill_attention(builds: dict, args) -> None:
    torch.manual_seed(0)
    # (new tokens, context, heads, kv heads, head_dim): the 135M, the 1.7B shape and Llama-3-8B's heads
    for length, context, heads, kv_heads, dim in [(512, 512, 9, 3, 64), (1500, 1500, 9, 3, 64), (512, 512, 32, 32, 64),
                                                  (476, 1500, 32, 32, 64), (1024, 1024, 32, 8, 128)]:
        q = torch.randn(length, heads, dim)
        k, v = torch.randn(context, kv_heads, dim), torch.randn(context, kv_heads, dim)
        outs = {name: torch.empty(length, heads, dim) for name in builds}

        def run(name, module):
            out = outs[name]
            module.prefill_attention(length, context, heads, kv_heads, dim, q.data_ptr(), heads * dim, dim, False,
                                     k.data_ptr(), kv_heads * dim, dim, False, v.data_ptr(), kv_heads * dim, dim, False,
                                     dim ** -0.5, out.data_ptr(), False)

        best = best_of(builds, run, args.rounds)
        flops = 4 * (context * length - length * length / 2) * dim * heads  # the causal part of QK^T and PV
        diff = (outs["old"] - outs["new"]).abs().max().item()
        report(f"prefill attention {length} new / {context}, {heads}/{kv_heads} heads x {dim}", best, flops,
               "GFLOP/s", diff)


def ab_decode_attention(builds: dict, args) -> None:
    torch.manual_seed(0)
    block_size = 16
    # the 135M, the 1.7B shape, then the heads of Llama-3-8B (also over a long context), Llama-3.2-3B, Llama-2-7B
    # and Qwen2.5-0.5B
    for batch, heads, kv_heads, dim, context in [(1, 9, 3, 64, 550), (16, 9, 3, 64, 1600), (1, 32, 32, 64, 600),
                                                 (1, 32, 8, 128, 600), (4, 32, 8, 128, 1500), (1, 32, 8, 128, 8000),
                                                 (1, 24, 8, 128, 600), (1, 32, 32, 128, 600), (1, 14, 2, 64, 600)]:
        per_seq = -(-context // block_size)
        if args.cache_resident:  # one layer whose sequences share their blocks: the K/V rows come from cache
            blocks, layers = per_seq, 1
            tables = torch.arange(per_seq, dtype=torch.int32).repeat(batch, 1)
        else:  # one decode step's worth of calls, each layer with its own cache: read from DRAM, as in a model
            blocks, layers = batch * per_seq, 24
            tables = torch.randperm(blocks).to(torch.int32).view(batch, -1).contiguous()  # scattered blocks
        caches = [(torch.randn(blocks, kv_heads, block_size, dim).bfloat16(),
                   torch.randn(blocks, kv_heads, block_size, dim).bfloat16()) for _ in range(layers)]
        lens = torch.full((batch,), context, dtype=torch.int32)
        q = torch.randn(batch, heads, dim)
        outs = {name: torch.empty(batch, heads, dim) for name in builds}

        def run(name, module):
            out = outs[name]
            for k, v in caches:
                module.paged_attention_decode(batch, heads, kv_heads, dim, block_size, tables.shape[1], blocks,
                                              q.data_ptr(), False, heads * dim, dim, k.data_ptr(), v.data_ptr(), 1, 0,
                                              0, tables.data_ptr(), lens.data_ptr(), dim ** -0.5, out.data_ptr(), False)

        best = best_of(builds, run, args.rounds)
        best = {name: t / layers for name, t in best.items()}
        kv_bytes = 2 * batch * context * kv_heads * dim * 2
        diff = (outs["old"] - outs["new"]).abs().max().item()
        report(f"decode attention {batch} x {context}, {heads}/{kv_heads} heads x {dim}", best, kv_bytes, "GB/s", diff)


def ab_sample(builds: dict, args) -> None:
    # The sampler's cases of benchmarks/bench_sampler.py, on logits peaked like a language model's, plus a flat
    # row (temperature 5), whose top-p cut gathers most of the vocabulary. Each call gets a fresh copy of the
    # logits (the kernel overwrites them), so the copy is timed too, alike for both builds.
    rows, vocab = 64, 49152
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, :8] += 12
    work = {name: logits.clone() for name in builds}
    for label, (temperature, top_k, top_p, min_p) in {
            "temperature 0.7": (0.7, 0, 1.0, 0.0), "temperature 0.7, top-p 0.95": (0.7, 0, 0.95, 0.0),
            "temperature 0.7, top-k 40, min-p 0.05": (0.7, 40, 1.0, 0.05),
            "temperature 5 (flat), top-p 0.95": (5.0, 0, 0.95, 0.0)}.items():
        params = [torch.full((rows,), temperature), torch.full((rows,), top_k, dtype=torch.int64),
                  torch.full((rows,), top_p), torch.full((rows,), min_p),
                  torch.rand(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]
        picks = {name: torch.empty(rows, dtype=torch.int64) for name in builds}

        def run(name, module):
            w = work[name]
            w.copy_(logits)
            module.sample(rows, vocab, w.data_ptr(), vocab, *(p.data_ptr() for p in params), picks[name].data_ptr())

        best = best_of(builds, run, args.rounds)
        diff = float((picks["old"] != picks["new"]).sum())  # rows that picked another token
        report(f"sample {rows} x {vocab}, {label}", best, None, "", diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="the old build's _kernels*.so (the installed ironlm is the new one), or an ISA "
                                    "level of the installed build to compare against the level in use")
    parser.add_argument("kernel", choices=["gemm", "prefill-attention", "decode-attention", "sample"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per build (best kept)")
    parser.add_argument("--fmt", default="int4_sym", choices=sorted(FORMAT_IDS))
    parser.add_argument("--rows", default="1,16,512")
    parser.add_argument("--shapes", default="2048x2048,6144x2048,2048x8192", help="N x K weights, comma-separated")
    parser.add_argument("--cache-resident", action="store_true",
                        help="gemm: one copy of the weights, which stay in cache; decode-attention: the sequences "
                             "of a batch share one layer's blocks, so K and V are read from cache. Either way the "
                             "kernel's own work shows")
    args = parser.parse_args()
    level = new_kernels.active_isa()[0]
    if args.old in new_kernels.supported_isas():
        builds = {"old": AtLevel(args.old), "new": AtLevel(level)}
        print(f"old: ISA {args.old}; new: ISA {level}; both {new_kernels.__file__}, {args.threads} threads")
    else:
        builds = {"old": load_old(args.old), "new": new_kernels}
        print(f"old: {args.old}; new: {new_kernels.__file__}; ISA {level}, {args.threads} threads")
    for module in builds.values():
        module.set_num_threads(args.threads)
    {"gemm": ab_gemm, "prefill-attention": ab_prefill_attention, "decode-attention": ab_decode_attention,
     "sample": ab_sample}[args.kernel](builds, args)


if __name__ == "__main__":
    main()
