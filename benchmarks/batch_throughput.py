"""Bulk summarisation throughput: documents/hour for N synthetic records of about --doc-tokens tokens each.

    python benchmarks/batch_throughput.py --num-docs 200                       # embedded SmolLM2-135M Q4_1
    python benchmarks/batch_throughput.py --num-docs 200 --model-shape SmolLM2-1.7B --format Q4_0
    python benchmarks/batch_throughput.py --num-docs 64 --peer-docs 16 --model-shape SmolLM2-1.7B --format Q4_0

ironlm runs all documents through the job runner (the engine of `ironlm batch` / `ironlm summarize`, output
appended durably as there), keeping many documents in flight. llama.cpp (llama-cpp-python) runs the same
documents one at a time, as a script calling it would. Both get the same prompt token ids (a summarisation
prompt in the chat template around a made-up patient note, English and Chinese alternating, cut to exactly
--doc-tokens), greedy decoding of exactly --new-tokens tokens (end-of-sequence ignored), and --threads threads.
Each engine runs in its own subprocess, one after the other, so peak memory is its own. Peak memory is also
taken per quarter of the documents: if it does not grow from the first quarter to the last, memory does not
grow with the number of documents. Prints a markdown section for BENCHMARKS.md (it writes nothing there).

--peer-docs N gives llama.cpp only the first N documents: it runs them one at a time, all of one length, so
its documents/hour does not depend on how many it runs, while ironlm's counts the start and the tail of its
batch (the last documents decoding alone) and needs many documents to show its steady rate.
"""
import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# Importing ironlm sets OMP_WAIT_POLICY=PASSIVE for its own process; llama.cpp's worker gets the environment as it
# was (its OpenMP threads sleeping between ops make it about 3x slower).
PEER_ENV = dict(os.environ)
sys.path.insert(0, str(ROOT))

NOTE_EN = ("Visit {v}: {name}, {age}, presented with {a} and {b} for {d} days. Temperature {t} C, heart rate {hr}. "
           "Examination showed {f}. Blood count: white cells {w} x10^9/L. Plan: {p}; review in {r} days.\n\n")
NOTE_ZH = ("第{v}次就诊：患者{name_zh}，{age}岁，因{a_zh}、{b_zh}{d}天就诊。体温{t}℃，心率{hr}次/分。查体：{f_zh}。"
           "血常规示白细胞{w}×10⁹/L。处理：{p_zh}；嘱{r}天后复诊。\n\n")
WORDS = {
    "name": ["Alex Morgan", "Jamie Lee", "Sam Carter", "Riley Brooks"], "name_zh": ["王伟", "李娜", "张敏", "陈静"],
    "a": ["fever", "cough", "chest pain", "dizziness"], "b": ["fatigue", "nausea", "back pain", "shortness of breath"],
    "a_zh": ["发热", "咳嗽", "胸痛", "头晕"], "b_zh": ["乏力", "恶心", "腰痛", "气促"],
    "f": ["crackles at both lung bases", "a regular rhythm without murmur", "right lower quadrant tenderness"],
    "f_zh": ["双肺可闻及湿啰音", "心律齐，未闻及杂音", "右下腹压痛"],
    "p": ["start ceftriaxone", "aspirin and a statin", "abdominal CT", "oral fluids"],
    "p_zh": ["头孢曲松抗感染", "阿司匹林及他汀", "腹部CT检查", "补液对症支持"],
}
INSTRUCTION = {"en": "Summarize this patient record in a few sentences, keeping names, numbers and dates.",
               "zh": "请用简洁的中文概括这份病历的要点，保留姓名、数字和日期。"}


def make_documents(tokenizer, num_docs: int, doc_tokens: int, seed: int) -> list[list[int]]:
    """Prompt token ids, each exactly doc_tokens long: chat template + instruction + a made-up note cut to fit."""
    rng = random.Random(seed)
    marker = "\u2063NOTE\u2063"
    docs = []
    for i in range(num_docs):
        lang = "zh" if i % 2 else "en"
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{INSTRUCTION[lang]}\n\n{marker}"}],
                                             add_generation_prompt=True)
        before, after = text.split(marker)
        head = tokenizer.encode(before, add_special_tokens=False)
        tail = tokenizer.encode(after, add_special_tokens=False)
        room = doc_tokens - len(head) - len(tail)
        note_ids: list[int] = []
        visit = 1
        while len(note_ids) < room:
            fields = {k: rng.choice(v) for k, v in WORDS.items()}
            fields.update(v=visit, age=rng.randint(18, 95), d=rng.randint(1, 14), t=f"{rng.uniform(36, 40):.1f}",
                          hr=rng.randint(55, 130), w=f"{rng.uniform(3, 20):.1f}", r=rng.randint(3, 30))
            note_ids += tokenizer.encode((NOTE_ZH if lang == "zh" else NOTE_EN).format(**fields),
                                         add_special_tokens=False)
            visit += 1
        docs.append(head + note_ids[:room] + tail)
    return docs


class MemoryByQuarter:
    """Peak resident memory in each quarter of the documents (read from /proc/self/status VmRSS)."""

    def __init__(self, num_docs: int):
        self.num_docs = num_docs
        self.peaks = [0, 0, 0, 0]

    def sample(self, num_finished: int) -> None:
        """Called while documents num_finished... are being worked on."""
        quarter = min(3, num_finished * 4 // max(1, self.num_docs))
        self.peaks[quarter] = max(self.peaks[quarter], rss_bytes())


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --- workers ---------------------------------------------------------------------------------------------------

def worker_ironlm(args, docs: list[list[int]]) -> dict:
    from ironlm import LLM, SamplingParams
    from ironlm.bench.harness import peak_rss_bytes, reset_peak_rss
    from ironlm.cli import memory_size
    from ironlm.jobs.resume import DurableAppender
    from ironlm.jobs.runner import JobRunner, Task

    llm = LLM(model=args.model, dtype=args.dtype, threads=args.threads, max_num_seqs=args.max_num_seqs,
              **({} if args.prompt_lookup is None else {"prompt_lookup": args.prompt_lookup}),
              max_model_len=args.doc_tokens + args.new_tokens + 16, kv_cache_dtype=args.kv_cache_dtype,
              kv_cache_bytes=memory_size(args.kv_cache_memory) if args.kv_cache_memory else None)
    rss_loaded = rss_bytes()
    reset_peak_rss()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True,
                            repetition_penalty=args.repetition_penalty)
    memory = MemoryByQuarter(len(docs))

    def task(i: int) -> Task:
        def start():
            [result] = yield [(docs[i], params)]
            return {"custom_id": f"doc-{i}", "summary": result.text, "num_tokens": result.num_tokens}
        return Task(f"doc-{i}", start)

    with tempfile.TemporaryDirectory() as tmp, DurableAppender(Path(tmp) / "out.jsonl") as out:
        start = time.perf_counter()
        stats = JobRunner(llm.engine).run((task(i) for i in range(len(docs))), lambda key, record: out.append(record),
                                          lambda key, exc: None,
                                          lambda s: memory.sample(s.num_done + s.num_failed))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "num_done": stats.num_done, "generated_tokens": stats.num_generated_tokens,
            "rss_loaded": rss_loaded, "peak_rss": peak_rss_bytes(), "quarter_peaks": memory.peaks,
            "max_num_seqs": args.max_num_seqs, "kv_cache_dtype": llm.engine.kv_dtype_name,
            "kv_blocks": llm.engine.block_manager.num_blocks}


def worker_llama_cpp(args, docs: list[list[int]]) -> dict:
    """Each document alone, as compare.py's llama.cpp loop does: prefill, then greedy evals one token at a time."""
    import numpy as np
    from llama_cpp import Llama

    from ironlm.bench.harness import peak_rss_bytes

    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=args.doc_tokens + args.new_tokens + 8, n_batch=512, verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:  # greedy, from the logits of the last evaluated token
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    memory = MemoryByQuarter(len(docs))
    start = time.perf_counter()
    for i, ids in enumerate(docs):
        llm.reset()
        llm.eval(ids)
        token = next_token()
        for _ in range(args.new_tokens - 1):
            llm.eval([token])
            token = next_token()
        memory.sample(i)  # while on document i, as the ironlm side samples while documents are running
    wall = time.perf_counter() - start
    return {"wall_s": wall, "num_done": len(docs), "generated_tokens": len(docs) * args.new_tokens,
            "peak_rss": peak_rss_bytes(), "quarter_peaks": memory.peaks}


WORKERS = {"ironlm": worker_ironlm, "llama.cpp": worker_llama_cpp}


# --- driver ----------------------------------------------------------------------------------------------------

def prepare_model(args) -> tuple[str, str]:
    """(label, GGUF path) that both engines run."""
    if not args.model_shape:
        from compare import default_gguf, gguf_format

        path = Path(args.model) if args.model else default_gguf()
        return f"{path.stem} ({gguf_format(path)})", str(path)
    from compare import hf_to_gguf_bf16, quantize

    from ironlm.bench.shapes import build_shape_model

    model_dir = build_shape_model(args.model_shape)
    bf16 = model_dir / "model.BF16.gguf"
    if not bf16.exists():
        hf_to_gguf_bf16(model_dir, bf16)
    path = model_dir / f"model.{args.format}.gguf"
    if args.format != "BF16" and not path.exists():
        quantize(bf16, path, args.format, args.threads)
    return f"{args.model_shape} shape, random weights ({args.format})", str(path)


def run_worker(engine: str, args, docs_file: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--docs-file", docs_file, "--model", args.model,
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--doc-tokens", str(args.doc_tokens),
           "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-dtype", args.kv_cache_dtype,
           "--repetition-penalty", str(args.repetition_penalty)] + (
        ["--prompt-lookup", str(args.prompt_lookup)] if args.prompt_lookup is not None else []) + (
        ["--dtype", args.dtype] if args.dtype else []) + (
        ["--kv-cache-memory", args.kv_cache_memory] if args.kv_cache_memory else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=PEER_ENV)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def markdown(label: str, rows: list[tuple[str, dict]], args, load: tuple, skipped: list[str]) -> str:
    from ironlm.hardware import cpu_info

    info = cpu_info()
    lines = [f"## Bulk summarisation throughput: {label}", "",
             f"`python benchmarks/batch_throughput.py --num-docs {args.num_docs}"
             f"{' --peer-docs ' + str(args.peer_docs) if args.peer_docs else ''} --doc-tokens {args.doc_tokens} "
             f"--new-tokens {args.new_tokens}{' --model-shape ' + args.model_shape + ' --format ' + args.format if args.model_shape else ''}"
             f"{' --kv-cache-dtype ' + args.kv_cache_dtype if args.kv_cache_dtype != 'auto' else ''}"
             f"{' --kv-cache-memory ' + args.kv_cache_memory if args.kv_cache_memory else ''}"
             f"{' --repetition-penalty ' + str(args.repetition_penalty) if args.repetition_penalty != 1.0 else ''}"
             f"{' --prompt-lookup ' + str(args.prompt_lookup) if args.prompt_lookup is not None else ''}"
             f"{' --engines ' + ','.join(args.engines) if args.engines != list(WORKERS) else ''}` "
             f"on {info.model_name}, {args.threads} threads, load average {load[0]:.1f} at start, "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| engine | documents | wall | documents/hour | generated tok/s | peak RSS | peak RSS 1st → 4th quarter | vs llama.cpp |",
             "|---|---|---|---|---|---|---|---|"]
    base = next((r for e, r in rows if e == "llama.cpp" and "error" not in r), None)
    for engine, r in rows:
        if "error" in r:
            lines.append(f"| {engine} | failed: {r['error']} | | | | | | |")
            continue
        per_hour = r["num_done"] / r["wall_s"] * 3600
        ratio = f"{per_hour / (base['num_done'] / base['wall_s'] * 3600):.2f}x" if base else "n/a"
        q = r["quarter_peaks"]
        name = engine + (f" (max_num_seqs {r['max_num_seqs']}, {r['kv_cache_dtype']} KV, {r.get('kv_blocks', '?')} "
                         "KV blocks)" if engine == "ironlm" else " (one at a time)")
        lines.append(f"| {name} | {r['num_done']} | {r['wall_s']:,.0f} s | {per_hour:,.0f} | "
                     f"{r['generated_tokens'] / r['wall_s']:,.1f} | {_mib(r['peak_rss'])} | "
                     f"{_mib(q[0]) if q[0] else 'n/a'} → {_mib(q[3]) if q[3] else 'n/a'} | {ratio} |")  # n/a: under 4 documents
    lines += ["", f"Each document: {args.doc_tokens} prompt tokens, {args.new_tokens} generated (greedy, EOS ignored). "
              "Model loading is not counted. 6,000 records in 8 hours needs 750 documents/hour."]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-docs", type=int, default=200)
    parser.add_argument("--peer-docs", type=int, help="llama.cpp: run only the first N documents (default: all)")
    parser.add_argument("--doc-tokens", type=int, default=1500)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    parser.add_argument("--model-shape", help="random-weight model in a public shape, e.g. SmolLM2-1.7B")
    parser.add_argument("--format", default="Q4_0", choices=["BF16", "Q8_0", "Q4_0"], help="GGUF format for a shape")
    parser.add_argument("--engines", type=lambda s: s.split(","), default=list(WORKERS))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="ironlm compute dtype")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="ironlm: documents decoding together")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "int8"],
                        help="ironlm's KV cache element type")
    parser.add_argument("--kv-cache-memory", metavar="SIZE", help="ironlm's KV cache memory bound, e.g. 2G "
                        "(default: ironlm's, half the available memory less the weights)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="ironlm only (`ironlm summarize` uses 1.1); llama.cpp's penalty is another rule")
    parser.add_argument("--prompt-lookup", type=int, metavar="K", help="ironlm: most prompt-lookup drafts per step "
                        "(default: the engine's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=6 * 3600, help="seconds per engine")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--docs-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # the driver always passes --threads; importing ironlm first would set OMP_WAIT_POLICY
        docs = json.loads(Path(args.docs_file).read_text())
        print(json.dumps(WORKERS[args.worker](args, docs)))
        return 0
    from ironlm.cli import memory_size
    from ironlm.hardware import default_threads

    if args.kv_cache_memory:  # checked here, before any engine runs; the worker gets it as given
        try:
            memory_size(args.kv_cache_memory)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--kv-cache-memory: {exc}")
    if args.repetition_penalty != 1.0 and "llama.cpp" in args.engines:
        parser.error("--repetition-penalty needs --engines ironlm: llama.cpp's penalty works over a window of "
                     "recent tokens, so the two would not run the same decoding")
    args.threads = args.threads or default_threads()

    from ironlm.formats import load_checkpoint

    load = os.getloadavg()
    label, args.model = prepare_model(args)
    tokenizer = load_checkpoint(args.model).tokenizer
    if tokenizer.chat_template is None:  # a shape's GGUF: SmolLM2's tokenizer and template
        from ironlm.formats import default_model_path
        tokenizer = load_checkpoint(default_model_path()).tokenizer
    docs = make_documents(tokenizer, args.num_docs, args.doc_tokens, args.seed)
    rows, skipped = [], []
    for engine in args.engines:
        if engine == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
            skipped.append("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python)")
            print(f"skipping {engine}: llama-cpp-python is not installed", file=sys.stderr)
            continue
        mine = docs[:args.peer_docs] if engine == "llama.cpp" and args.peer_docs else docs
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(mine, f)
        try:
            print(f"running {engine} on {len(mine)} documents ...", file=sys.stderr, flush=True)
            result = run_worker(engine, args, f.name)
        finally:
            os.unlink(f.name)
        print(f"  {result}", file=sys.stderr, flush=True)
        rows.append((engine, result))
    print(markdown(label, rows, args, load, skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
