"""Prompt lookup (--prompt-lookup K) on the real SmolLM2-135M: decode speed of one answer at a time, with and without
drafts, beside llama.cpp with and without its own prompt-lookup drafts (llama-cpp-python's LlamaPromptLookupDecoding).

    python benchmarks/prompt_lookup.py                      # K = 0, 4, 8; llama.cpp plain and with 10 drafts
    python benchmarks/prompt_lookup.py --lookups 0,8 --new-tokens 256 --no-peer
    python benchmarks/prompt_lookup.py --step-costs ~/.cache/ironlm/shapes/SmolLM2-1.7B/model.Q4_0.gguf

Tasks, each a chat prompt in the model's template: summarising a made-up patient note (the bulk job's documents),
summarising and quoting from a short story (tests/data/perplexity.txt), and, as a control where nothing repeats,
writing a poem. Greedy decoding of --new-tokens tokens, end-of-sequence ignored on both sides. Decode tok/s = new
tokens / the time after the first. Each engine setting runs in its own subprocess, one after the other. The table
also gives the drafts kept per draft computed, and whether the answer equals the one without drafts (bf16 rounds
a few-row step apart from a one-row step, so a near tie may flip; the tests check the logic in float32).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
# Importing ironlm sets OMP_WAIT_POLICY=PASSIVE for its own process; llama.cpp's worker gets the environment as it
# was, and does not import ironlm (its OpenMP threads sleeping between ops make it about 3x slower).
PEER_ENV = dict(os.environ)

STORY = (ROOT.parent / "tests" / "data" / "perplexity.txt").read_text()
TASKS = {
    "note summary": None,  # a made-up patient note from batch_throughput.make_documents
    "story summary": f"Summarize this text in a few sentences.\n\n{STORY}",
    "story quotes": f"Quote, word for word, the three sentences of this text about the river.\n\n{STORY}",
    "poem (control)": "Write a poem of twelve lines about the sea in winter.",
}


def prompts(tokenizer, batches: list[int]) -> dict[str, list]:
    from batch_throughput import make_documents

    ids = {name: tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                                add_generation_prompt=True), add_special_tokens=False)
           for name, text in TASKS.items() if text is not None}
    notes = make_documents(tokenizer, max(batches, default=1), 700, seed=1)
    return {"note summary": make_documents(tokenizer, 1, 700, seed=0)[0], **ids, "notes": notes}


def worker_ironlm(args, runs: dict[str, list[int]]) -> dict:
    from ironlm import LLM, SamplingParams

    llm = LLM(threads=args.threads, prompt_lookup=args.k, max_model_len=2048, dtype=args.dtype, quant=args.quant)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    results = {}
    for name, ids in runs.items():
        if name == "notes":
            continue
        times, drafted, kept = [], 0, 0
        for _ in range(args.repeats + 1):  # the first is a warm-up
            before = llm.engine.stats()
            [r] = llm.generate({"prompt_token_ids": ids}, params)
            after = llm.engine.stats()
            times.append(r.metrics["decode_s"])
            drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
            kept = after["num_kept_draft_tokens"] - before["num_kept_draft_tokens"]
        results[name] = {"decode_s": statistics.median(times[1:]), "tokens": r.token_ids, "drafted": drafted,
                         "kept": kept}
    for batch in args.batches:  # notes decoding together: tok/s of the steps after the last first token
        notes = [{"prompt_token_ids": ids} for ids in runs["notes"][:batch]]
        rates = []
        for _ in range(args.repeats + 1):
            out = llm.generate(notes, params)
            window = max(r.metrics["total_s"] for r in out) - max(r.metrics["ttft_s"] for r in out)
            rates.append(sum(len(r.token_ids) - 1 for r in out) / window)
        results[f"{batch} notes"] = {"tok_s": statistics.median(rates[1:])}
    return results


def worker_llama_cpp(args, runs: dict[str, list[int]]) -> dict:
    """K = -1: the low-level eval loop of compare.py (llama.cpp's own speed); else create_completion, llama-cpp-
    python's generation API, the only one with its prompt-lookup drafts, without (K = 0) and with them."""
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=args.k) if args.k > 0 else None
    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=2048, n_batch=512, draft_model=draft, logits_all=draft is not None,  # drafts need them
                verbose=False)
    eos, n_vocab = llm.token_eos(), llm.n_vocab()
    results = {}
    for name, ids in runs.items():
        if name == "notes":
            continue
        times = []
        for _ in range(args.repeats + 1):
            llm.reset()
            if args.k < 0:
                llm.eval(ids)
                first = time.perf_counter()
                for _ in range(args.new_tokens - 1):
                    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
                    llm.eval([int(np.argmax(logits))])
                times.append(time.perf_counter() - first)
                continue
            stream = llm.create_completion(ids, max_tokens=args.new_tokens, temperature=0.0, stream=True,
                                           logit_bias={eos: -100.0})  # end-of-sequence ignored, as on our side
            next(stream)
            first = time.perf_counter()
            count = 1 + sum(1 for _ in stream)
            times.append((time.perf_counter() - first) * (args.new_tokens - 1) / max(1, count - 1))
        results[name] = {"decode_s": statistics.median(times[1:])}
    return results


def step_costs(model: str | None, threads: int, repeats: int) -> None:
    """Milliseconds of one decode step of a sequence's next token and c - 1 drafts (c graph rows), against c = 1:
    what a step of drafts costs, whatever is kept of them. Random token ids: the cost does not depend on them."""
    import torch

    from ironlm import LLM, SamplingParams
    from ironlm.engine.sequence import Sequence

    llm = LLM(model=model, threads=threads, max_model_len=1024)
    runner, blocks = llm.engine.runner, llm.engine.block_manager
    seq = Sequence("x", [1000 + i % 7000 for i in range(600)], SamplingParams())
    blocks.append_slots(seq, seq.num_tokens)
    with torch.inference_mode():
        runner._forward([(seq, 500)])  # a 500-token context to attend to
        costs = {}
        for rows in (1, 2, 3, 5, 9, 13):
            seq.num_computed_tokens = 500
            step = ([(seq, rows)], {"x": rows - 1})
            runner._forward(*step)  # captures the graph
            times = []
            for _ in range(max(5, repeats * 5)):
                start = time.perf_counter()
                runner._forward(*step)
                times.append(time.perf_counter() - start)
            costs[rows] = statistics.median(times) * 1000
    print(f"Decode step cost by rows (one sequence: its next token and rows - 1 drafts), {model or 'embedded 135M'},"
          f" {threads} threads\n")
    print("| rows | " + " | ".join(map(str, costs)) + " |")
    print("|---|" + "---|" * len(costs))
    print("| ms | " + " | ".join(f"{ms:.1f}" for ms in costs.values()) + " |")
    print("| vs 1 row | " + " | ".join(f"{ms / costs[1]:.2f}x" for ms in costs.values()) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lookups", type=lambda s: [int(x) for x in s.split(",")], default=[0, 4, 8],
                        help="ironlm --prompt-lookup values")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                        help="ironlm only: also this many note summaries decoding together (e.g. 4,16)")
    parser.add_argument("--peer-lookup", type=int, default=10, help="llama.cpp's drafts per step (its default: 10)")
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median), after one warm-up")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="ironlm compute dtype")
    parser.add_argument("--quant", default="auto", help="ironlm weight format (none: torch, for a float32 check)")
    parser.add_argument("--step-costs", metavar="MODEL", nargs="?", const="",
                        help="only time decode steps of 1 to 13 rows on MODEL (a GGUF; none: the embedded 135M)")
    parser.add_argument("--worker", choices=["ironlm", "llama.cpp"], help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--runs", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)  # llama.cpp's worker: the embedded GGUF's path
    args = parser.parse_args()
    if args.worker:
        runs = json.loads(Path(args.runs).read_text())
        worker = worker_ironlm if args.worker == "ironlm" else worker_llama_cpp
        print(json.dumps(worker(args, runs)))
        return 0

    from ironlm.formats import default_model_path, load_checkpoint
    from ironlm.hardware import default_threads

    args.threads = args.threads or default_threads()
    if args.step_costs is not None:
        step_costs(args.step_costs or None, args.threads, args.repeats)
        return 0
    runs = prompts(load_checkpoint(default_model_path()).tokenizer, args.batches)
    runs_file = Path("/tmp") / f"ironlm-prompt-lookup-{time.time_ns()}.json"
    runs_file.write_text(json.dumps(runs))
    settings = [("ironlm", k) for k in args.lookups]
    if not args.no_peer:
        settings += [("llama.cpp", -1), ("llama.cpp", 0), ("llama.cpp", args.peer_lookup)]
    results = {}
    try:
        for engine, k in settings:
            command = [sys.executable, __file__, "--worker", engine, "--k", str(k), "--runs", str(runs_file),
                       "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                       "--batches", ",".join(map(str, args.batches)), "--model", str(default_model_path()),
                       "--threads", str(args.threads), "--quant", args.quant] + (["--dtype", args.dtype] if args.dtype
                                                                                 else [])
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  env=PEER_ENV if engine == "llama.cpp" else None)
            if done.returncode:
                print(f"{engine} K={k} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[(engine, k)] = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        runs_file.unlink()

    tasks = [name for name in runs if name != "notes"]
    base = results.get(("ironlm", 0))
    print(f"Decode tok/s, one answer at a time, {args.new_tokens} new tokens, {args.threads} threads, "
          f"SmolLM2-135M-Instruct (embedded GGUF)\n")
    print(f"{args.dtype or 'default'} dtype, --quant {args.quant}\n")
    print("| engine | drafts K | " + " | ".join(tasks) + " |")
    print("|---|---|" + "---|" * len(tasks))
    for (engine, k), per_task in results.items():
        cells = []
        for name in tasks:
            r = per_task[name]
            cell = f"{(args.new_tokens - 1) / r['decode_s']:.1f}"
            if engine == "ironlm" and k:
                same = "same" if base and r["tokens"] == base[name]["tokens"] else "differs"
                cell += f" ({r['kept']}/{r['drafted']} kept, {same})"
            cells.append(cell)
        label = engine if engine == "ironlm" else "llama.cpp, eval loop" if k < 0 else "llama.cpp, create_completion"
        print(f"| {label} | {max(k, 0)} | " + " | ".join(cells) + " |")
    if args.batches:
        print(f"\nTotal decode tok/s of note summaries decoding together (ironlm)\n")
        print("| drafts K | " + " | ".join(f"{b} notes" for b in args.batches) + " |")
        print("|---|" + "---|" * len(args.batches))
        for (engine, k), per_task in results.items():
            if engine == "ironlm":
                print(f"| {k} | " + " | ".join(f"{per_task[f'{b} notes']['tok_s']:.1f}" for b in args.batches) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
