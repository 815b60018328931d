"""Measurements: prefill and decode tokens/s through the public LLM API, each held to its roofline.

Method: one or more warm-up runs, then `repeats` runs; a figure is the median with its min-max spread, and is
flagged noisy when the spread exceeds 10 % of the median. Every prompt is fresh random token ids, so prefix
caching never turns a prefill into a cache hit.

Roofline (weights only; attention over the KV cache is ignored, which is fair at the short contexts used):
  decode,  batch B:  tok/s <= min(B * bandwidth / weight_bytes_per_token, peak_flop_s / (2 * flop_params))
  prefill, L tokens: tok/s <= min(peak_flop_s / (2 * flop_params), L * bandwidth / weight_bytes_per_token)
"""
import gc
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

NOISY_SPREAD = 0.10  # (max - min) / median above this flags a figure as noisy
SKIPPED_TENSORS = ("rope_freqs",)  # checkpoint entries that are not parameters


@dataclass
class ModelFacts:
    name: str
    path: str
    format: str
    dtype: str
    threads: int
    num_params: int                 # logical parameters in the checkpoint (a tied lm_head once)
    flop_params_per_token: int      # weights in matrix products per token (lm_head included; embedding lookup not)
    weight_bytes: int         # weights as held in memory by the engine
    weight_bytes_per_token: int     # bytes read per decoded token
    tied_embeddings: bool
    weight_bytes_note: str
    vocab_size: int
    num_matmuls_by_format: dict[str, int]  # weight format -> number of matrix-product modules using it
    compute_dtype: str              # "int8" when integer weight kernels run, else the activation dtype


def _numel(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def flop_params(tensors: dict[str, tuple[int, ...]], tied: bool) -> int:
    """Weights multiplied per token: every 2-D tensor except the embedding table, which is a lookup unless it is
    also the lm_head (tied)."""
    total = 0
    for name, shape in tensors.items():
        if len(shape) != 2 or name.endswith(SKIPPED_TENSORS):
            continue
        if name.endswith("embed_tokens.weight") and not tied:
            continue
        total += _numel(shape)
    return total


def weight_bytes(entries: dict[str, tuple[tuple[int, ...], int]], tied: bool) -> tuple[int, int]:
    """(bytes held, bytes read per token) from name -> (shape, nbytes). Only one row of an untied embedding is read
    per token; a tied one is read whole by the lm_head."""
    total = per_token = 0
    for name, (shape, nbytes) in entries.items():
        total += nbytes
        if name.endswith("embed_tokens.weight") and not tied and len(shape) == 2:
            per_token += nbytes // shape[0]
        else:
            per_token += nbytes
    return total, per_token


def _live_weight_entries(model) -> tuple[dict[str, tuple[tuple[int, ...], int]], bool] | None:
    """name -> (shape, nbytes) of the engine's module, each storage once, and whether lm_head shares the embedding."""
    try:
        from torch import nn
    except ImportError:
        return None
    if not isinstance(model, nn.Module):
        return None
    entries, seen = {}, {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if name.rsplit(".", 1)[-1] in ("cos", "sin", "inv_freq", "cos_sin_cache") or t.is_meta:
            continue  # rotary tables are not weights
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            seen[key].append(name)
            continue
        seen[key] = [name]
        entries[name] = (tuple(t.shape), t.numel() * t.element_size())
    tied = any(any(n.endswith("embed_tokens.weight") for n in names) and any(n.startswith("lm_head") for n in names)
               for names in seen.values())
    return entries, tied


def _matmul_formats(model) -> dict[str, int]:
    """Counts of the weight formats of a module's matrix products: QuantLinear's `fmt`, or nn.Linear's dtype."""
    from torch import nn

    counts: dict[str, int] = {}
    if not isinstance(model, nn.Module):
        return counts
    for module in model.modules():
        fmt = getattr(module, "fmt", None)
        if not isinstance(fmt, str) and isinstance(module, nn.Linear):
            fmt = str(module.weight.dtype).removeprefix("torch.")
        if isinstance(fmt, str):
            counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def model_facts(llm) -> ModelFacts:
    """Sizes that the roofline needs, from the loaded engine (falling back to the checkpoint's storage sizes)."""
    ckpt = llm.checkpoint
    config = ckpt.config
    shapes = {n: tuple(s.shape) for n, s in ckpt.tensors.items() if not n.endswith(SKIPPED_TENSORS)}
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in shapes
    live = _live_weight_entries(getattr(llm.engine, "model", None))
    if live is not None:
        entries, live_tied = live
        # The engine may keep its own (e.g. quantized) lm_head copy: then the embedding is only a lookup.
        has_lm_head = any(name.startswith("lm_head.") for name in entries)
        tied_bytes = live_tied or not has_lm_head
        source = "the engine's loaded weights"
    else:
        entries = {n: (tuple(s.shape), s.nbytes) for n, s in ckpt.tensors.items() if not n.endswith(SKIPPED_TENSORS)}
        tied_bytes = tied
        source = "the checkpoint's storage sizes"
    total, per_token = weight_bytes(entries, tied_bytes)
    embed = ("shared with the lm_head, so the whole table is read" if tied_bytes
             else "a lookup (one row per token); the lm_head has its own weights")
    dtype = getattr(llm.engine, "dtype_name", None) or llm.config.dtype or "unknown"
    formats = _matmul_formats(getattr(llm.engine, "model", None))
    # Integer weight kernels may run on int8 dot products: hold them to the (higher) int8 peak.
    compute = "int8" if any(f.startswith("int") for f in formats) else dtype
    return ModelFacts(
        name=ckpt.name, path=str(ckpt.path), format=ckpt.format,
        dtype=dtype,
        threads=getattr(llm.engine, "threads", None) or llm.config.threads or 0,
        num_params=sum(_numel(s) for s in shapes.values()),
        flop_params_per_token=flop_params(shapes, tied),
        weight_bytes=total, weight_bytes_per_token=per_token, tied_embeddings=tied,
        weight_bytes_note=f"from {source}; embedding {embed}",
        vocab_size=int(config.get("vocab_size") or llm.tokenizer.vocab_size),
        num_matmuls_by_format=formats, compute_dtype=compute,
    )


def decode_roofline(batch: int, bandwidth_gb_s: float, weight_bytes_per_token: int, peak_gflop_s: float | None,
                    flop_params_per_token: int) -> tuple[float, str]:
    """(tokens/s, "memory" | "compute") for decoding `batch` sequences together."""
    memory = batch * bandwidth_gb_s * 1e9 / weight_bytes_per_token
    if peak_gflop_s:
        compute = peak_gflop_s * 1e9 / (2 * flop_params_per_token)
        if compute < memory:
            return compute, "compute"
    return memory, "memory"


def prefill_roofline(prompt_tokens: int, bandwidth_gb_s: float, weight_bytes_per_token: int,
                     peak_gflop_s: float | None, flop_params_per_token: int) -> tuple[float, str]:
    """(tokens/s, "memory" | "compute") for one prompt of `prompt_tokens` in one pass over the weights."""
    return decode_roofline(prompt_tokens, bandwidth_gb_s, weight_bytes_per_token, peak_gflop_s, flop_params_per_token)


def summarize(values: list[float]) -> dict:
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if median > 0 else 0.0
    return {"median": median, "min": min(values), "max": max(values), "spread_pct": 100.0 * spread,
            "noisy": spread > NOISY_SPREAD}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so later readings cover only what follows; False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory: VmHWM (since the last reset) or getrusage's lifetime maximum."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Runner:
    """Runs timed generations on one LLM with fresh random prompts."""

    def __init__(self, llm, seed: int = 0):
        from ironlm import SamplingParams

        self.llm = llm
        self.sampling_params = SamplingParams
        self.rng = np.random.default_rng(seed)
        # Ordinary tokens only: the first ids of a vocabulary are often special.
        self.high = min(llm.tokenizer.vocab_size, int(llm.checkpoint.config.get("vocab_size") or 1 << 30))
        self.low = min(256, self.high - 1)

    def prompts(self, count: int, length: int) -> list[dict]:
        return [{"prompt_token_ids": self.rng.integers(self.low, self.high, length).tolist()} for _ in range(count)]

    def prefill_once(self, prompt_tokens: int) -> float:
        """Seconds to the first token of one prompt (the engine's ttft_s, else wall time)."""
        params = self.sampling_params(max_tokens=1, ignore_eos=True)
        start = time.perf_counter()
        [result] = self.llm.generate(self.prompts(1, prompt_tokens), params)
        wall = time.perf_counter() - start
        return (result.metrics or {}).get("ttft_s") or wall

    def decode_once(self, batch: int, prompt_tokens: int, new_tokens: int) -> tuple[float, float, int]:
        """(decode seconds, time to first token of the batch, tokens generated after the first ones)."""
        params = self.sampling_params(max_tokens=new_tokens, ignore_eos=True)
        start = time.perf_counter()
        results = self.llm.generate(self.prompts(batch, prompt_tokens), params)
        wall = time.perf_counter() - start
        generated = sum(max(0, len(r.token_ids) - 1) for r in results)
        metrics = [r.metrics or {} for r in results]
        if all(m.get("arrival_time") is not None and m.get("ttft_s") is not None and m.get("total_s") is not None
               for m in metrics):
            first = max(m["arrival_time"] + m["ttft_s"] for m in metrics)   # the last sequence's first token
            finish = max(m["arrival_time"] + m["total_s"] for m in metrics)
            ttft = first - min(m["arrival_time"] for m in metrics)
            return max(finish - first, 1e-9), ttft, generated
        return wall, wall, generated  # no per-request metrics: the prefill is inside the decode time

    def repeat(self, fn, warmup: int, repeats: int) -> list:
        for _ in range(warmup):
            fn()
        return [fn() for _ in range(repeats)]


def bench_prefill(runner: Runner, facts: ModelFacts, probe, lengths: list[int], warmup: int, repeats: int,
                  peak_gflop_s: float | None, max_model_len: int | None) -> list[dict]:
    rows = []
    for length in lengths:
        if max_model_len is not None and length + 1 > max_model_len:
            rows.append({"prompt_tokens": length, "skipped": f"longer than the model's context ({max_model_len})"})
            continue
        times = runner.repeat(lambda: runner.prefill_once(length), warmup, repeats)
        stat = summarize([length / t for t in times])
        roof, bound = prefill_roofline(length, probe.bandwidth_read_gb_s, facts.weight_bytes_per_token,
                                       peak_gflop_s, facts.flop_params_per_token)
        rows.append({
            "prompt_tokens": length, "prefill_tok_s": stat["median"], "prefill_tok_s_min": stat["min"],
            "prefill_tok_s_max": stat["max"], "spread_pct": stat["spread_pct"], "noisy": stat["noisy"],
            "ttft_s": statistics.median(times), "roofline_tok_s": roof, "roofline_bound": bound,
            "roofline_pct": 100.0 * stat["median"] / roof,
        })
    return rows


def bench_decode(runner: Runner, facts: ModelFacts, probe, batches: list[int], prompt_tokens: int, new_tokens: int,
                 warmup: int, repeats: int, peak_gflop_s: float | None) -> list[dict]:
    rows = []
    for batch in batches:
        runs = runner.repeat(lambda: runner.decode_once(batch, prompt_tokens, new_tokens), warmup, repeats)
        stat = summarize([generated / seconds for seconds, _, generated in runs])
        roof, bound = decode_roofline(batch, probe.bandwidth_read_gb_s, facts.weight_bytes_per_token,
                                      peak_gflop_s, facts.flop_params_per_token)
        rows.append({
            "batch": batch, "decode_tok_s": stat["median"], "decode_tok_s_min": stat["min"],
            "decode_tok_s_max": stat["max"], "spread_pct": stat["spread_pct"], "noisy": stat["noisy"],
            "per_sequence_tok_s": stat["median"] / batch, "ttft_s": statistics.median(t for _, t, _ in runs),
            "roofline_tok_s": roof, "roofline_bound": bound, "roofline_pct": 100.0 * stat["median"] / roof,
        })
    return rows


def compute_peak(probe, compute_dtype: str) -> tuple[float | None, str]:
    """Peak G(FL)OP/s for a compute dtype ("int8", "bfloat16", "float32"); fp32 FMA where the CPU lacks the
    dtype's instructions. bf16 weights can also be widened to fp32 for FMA, which is faster where vdpbf16ps runs
    at under the FMA rate (Intel's Sapphire Rapids: about half; the GEMM picks it there), so bf16 is held to
    the higher of the two."""
    fp32 = probe.peak_gflop_s.get("fp32")
    if compute_dtype == "int8" and probe.peak_gflop_s.get("int8"):
        return probe.peak_gflop_s["int8"], "int8"
    bf16 = probe.peak_gflop_s.get("bf16") if compute_dtype == "bfloat16" else None
    if bf16 and (not fp32 or bf16 >= fp32):
        return bf16, "bf16"
    return fp32, "fp32"


def bench_model(llm, probe, lengths: list[int], batches: list[int], prompt_tokens: int, new_tokens: int,
                warmup: int, repeats: int, seed: int = 0) -> dict:
    """All figures for one loaded LLM, as JSON-ready dicts."""
    facts = model_facts(llm)
    peak, peak_dtype = compute_peak(probe, facts.compute_dtype)
    runner = Runner(llm, seed)
    max_len = getattr(llm.engine, "max_model_len", None)
    return {
        "model": asdict(facts),
        "compute_peak_dtype": peak_dtype,
        "compute_peak_gflop_s": peak,
        "prefill": bench_prefill(runner, facts, probe, lengths, warmup, repeats, peak, max_len),
        "decode": bench_decode(runner, facts, probe, batches, prompt_tokens, new_tokens, warmup, repeats, peak),
    }


def sweep_threads(load, thread_counts: list[int], get_probe, prompt_tokens: int, new_tokens: int,
                  prefill_tokens: int, warmup: int, repeats: int) -> dict:
    """Decode batch 1 and prefill of `prefill_tokens` at each thread count; `load(threads)` builds an LLM and
    `get_probe(threads)` gives the probe results for that count."""
    rows = []
    for threads in thread_counts:
        llm = load(threads)
        try:
            result = bench_model(llm, get_probe(threads), [prefill_tokens], [1], prompt_tokens, new_tokens,
                                 warmup, repeats)
        finally:
            del llm
            gc.collect()
        decode, prefill = result["decode"][0], result["prefill"][0]
        rows.append({"threads": threads, "decode_tok_s": decode["decode_tok_s"],
                     "decode_roofline_pct": decode["roofline_pct"], "decode_noisy": decode["noisy"],
                     "prefill_tokens": prefill_tokens, "prefill_tok_s": prefill.get("prefill_tok_s"),
                     "prefill_roofline_pct": prefill.get("roofline_pct"), "prefill_noisy": prefill.get("noisy")})
    best_decode = max(rows, key=lambda r: r["decode_tok_s"])["threads"]
    with_prefill = [r for r in rows if r["prefill_tok_s"] is not None]
    best_prefill = max(with_prefill, key=lambda r: r["prefill_tok_s"])["threads"] if with_prefill else None
    return {"rows": rows, "best_threads_decode": best_decode, "best_threads_prefill": best_prefill}
