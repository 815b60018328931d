"""Serving benchmark: N concurrent streaming chat clients against OpenAI-compatible servers (ironlm, llama-server, ...).

    python benchmarks/serve_bench.py --spawn ironlm                                   # embedded SmolLM2-135M
    python benchmarks/serve_bench.py --spawn ironlm --spawn llama-server /tmp/llama-server --gguf model.gguf \\
        --threads 2 --json out.json --plot out.png
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000/v1                   # a server already running

For each client count (default 1, 4, 16, 64), that many clients each send --requests-per-client streaming chat
requests back to back: a shared customer-service system prompt and a distinct question, --max-tokens new tokens,
greedy (or --temperature / --top-p), with `ignore_eos` so every engine writes the same number of tokens.
Reported per engine and client count: aggregate output tokens/s (completion tokens / wall time of the level),
median and p90 time to first token (request sent -> first non-empty content), median inter-token latency
((last - first content) / (tokens - 1) per request), requests completed and errors. Engines run one after
another, never together. Spawned servers bind 127.0.0.1 on a free port and are stopped at the end, also on error
or Ctrl-C/SIGTERM; --time-limit bounds the whole run.
With --repeats K every engine runs K times, alternating, and each client count reports its fastest repeat (on a
shared machine noise only slows a run down); all repeats are kept in the JSON under `raw_runs`.
"""
import argparse
import asyncio
import json
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

SYSTEM_PROMPT = ("You are the customer-service assistant of Northwind Outfitters, an online shop for outdoor gear. "
                 "Answer politely, concretely and briefly. If you need more details, ask for them.")
QUESTIONS = [
    "My parcel was marked as delivered yesterday but it is not at my door. What should I do?",
    "Can I change the delivery address of an order I placed an hour ago?",
    "The zip on the tent I bought last month broke on the first trip. Is that covered by the warranty?",
    "How do I return hiking boots that are half a size too small?",
    "I was charged twice for the same order. Can you refund one of the payments?",
    "Do you ship to Norway, and how long does delivery take?",
    "Which sleeping bag would you recommend for camping at minus five degrees Celsius?",
    "My discount code SUMMER15 says it is invalid at checkout. Why?",
    "Can I pick up my order in a store instead of having it delivered?",
    "The jacket I received is a different colour from the one I ordered. How can I exchange it?",
    "How do I reset the password of my customer account?",
    "Is the Trailblazer 45 backpack waterproof or only water resistant?",
    "When will the women's Alpine fleece in size M be back in stock?",
    "I would like to cancel my order. It has not shipped yet.",
    "Can I pay in instalments for a purchase of 600 euros?",
    "The tracking number you sent me does not work on the courier's website.",
    "What is the difference between your Basecamp and Summit tents?",
    "How should I wash a down jacket without ruining it?",
    "My refund was approved ten days ago but I have not received the money yet.",
    "Do you offer gift wrapping and can I add a personal message?",
    "One item of my order is missing from the box. What now?",
    "Can I return an item I bought on sale?",
    "Are your trekking poles allowed in hand luggage on a plane?",
    "I am a teacher planning a school trip. Do you give discounts for group orders?",
    "The stove I bought does not light. I followed the manual. What can I check?",
    "How long is the warranty on your headlamps, and what does it cover?",
    "Can I order a replacement buckle for my backpack instead of returning the whole bag?",
    "I received an email about a prize draw from your shop. Is that genuine?",
    "How do I unsubscribe from your newsletter?",
    "Is it possible to combine two orders into one shipment to save on postage?",
    "What size of climbing shoes should I pick if I wear 42 in street shoes?",
    "The boots I bought leak after three months of use. Can I get them repaired?",
]


# --- one engine: client loops over a base URL ------------------------------------------------------------------

@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    output_tokens: int = 0
    ttft_s: float | None = None     # request sent -> first non-empty content
    itl_s: float | None = None      # mean gap between tokens after the first
    latency_s: float | None = None


def chat_body(index: int, model: str, max_tokens: int, ignore_eos: bool, temperature: float = 0.0,
              top_p: float = 1.0) -> dict:
    """The request for client request number `index`: distinct per index (the order number), same length class."""
    question = QUESTIONS[index % len(QUESTIONS)]
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": f"My order number is NW-{48213 + 7 * index}. {question}"}]}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def one_request(client: httpx.AsyncClient, base_url: str, body: dict) -> RequestResult:
    start = time.perf_counter()
    first = last = None
    usage_tokens, content_chunks = None, 0
    try:
        async with client.stream("POST", base_url + "/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                return RequestResult(ok=False, error=f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(ok=False, error=f"stream error: {json.dumps(chunk['error'])[:200]}")
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        last = time.perf_counter()
                        first = first or last
                        content_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestResult(ok=False, error=f"{type(e).__name__}: {e}"[:200])
    if first is None:
        return RequestResult(ok=False, error="the stream had no content")
    # Usage counts tokens; chunks undercount when a detokenizer holds back partial characters.
    tokens = usage_tokens if usage_tokens is not None else content_chunks
    itl = (last - first) / (tokens - 1) if tokens > 1 else None
    return RequestResult(ok=True, output_tokens=tokens, ttft_s=first - start, itl_s=itl,
                         latency_s=time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(clients: int, results: list[RequestResult], wall_s: float) -> dict:
    done = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in done)
    ttfts = [r.ttft_s for r in done]
    itls = [r.itl_s for r in done if r.itl_s is not None]
    errors = [r.error for r in results if not r.ok]
    return {
        "clients": clients, "requests": len(results), "completed": len(done), "errors": len(errors),
        "error_examples": sorted(set(errors))[:3], "output_tokens": tokens, "wall_s": wall_s,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "output_tokens_per_request_mean": tokens / len(done) if done else None,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90),
        "itl_p50_ms": statistics.median(itls) * 1000 if itls else None,
        "latency_p50_s": percentile([r.latency_s for r in done], 50),
    }


async def run_level(base_url: str, args: argparse.Namespace, clients: int, first_index: int) -> dict:
    """`clients` closed-loop clients, each sending --requests-per-client requests one after another."""
    async def client_loop(client: httpx.AsyncClient, c: int) -> list[RequestResult]:
        out = []
        for r in range(args.requests_per_client):
            body = chat_body(first_index + c * args.requests_per_client + r, args.model_name, args.max_tokens,
                             args.ignore_eos, args.temperature, args.top_p)
            out.append(await one_request(client, base_url, body))
        return out

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(client, c) for c in range(clients)))
        wall_s = time.perf_counter() - start
    return summarise(clients, [r for results in per_client for r in results], wall_s)


async def run_engine(base_url: str, args: argparse.Namespace, deadline: float) -> list[dict]:
    """Warm up, then every client count in turn; a level past the deadline is recorded as timed out and ends the run."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0)) as client:
        warm_body = chat_body(10**6, args.model_name, 8, args.ignore_eos, args.temperature, args.top_p)
        warm = await one_request(client, base_url, warm_body)
    if not warm.ok:
        raise RuntimeError(f"warm-up request to {base_url} failed: {warm.error}")
    levels, first_index = [], 0
    for clients in args.clients:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            levels.append({"clients": clients, "timed_out": True})
            break
        try:
            level = await asyncio.wait_for(
                run_level(base_url, args, clients, first_index), remaining)
        except asyncio.TimeoutError:
            levels.append({"clients": clients, "timed_out": True})
            break
        levels.append(level)
        first_index += clients * args.requests_per_client
        print(f"  {clients:>3} clients: {level['output_tokens_per_s']:.1f} output tok/s, "
              f"{level['completed']}/{level['requests']} completed", file=sys.stderr, flush=True)
    return levels


# --- spawned servers -------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(kind: str, binary: str | None, port: int, args: argparse.Namespace) -> list[str]:
    if kind == "ironlm":
        command = [sys.executable, "-m", "ironlm.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning", "--drain-timeout", "5"]
        if args.model:
            command += ["-m", args.model]
        if args.threads:
            command += ["--threads", str(args.threads)]
        command += ["--max-model-len", str(args.ctx_per_slot)] if args.ctx_per_slot else []
        return command + shlex.split(args.ironlm_args)
    # llama.cpp splits -c over the -np slots; each slot needs the prompt plus max_tokens.
    ctx_per_slot = args.ctx_per_slot or 1024
    command = [binary, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(args.parallel),
               "-c", str(args.parallel * ctx_per_slot), "--no-webui"]
    if args.threads:
        command += ["-t", str(args.threads), "-tb", str(args.threads)]
    return command + shlex.split(args.llama_server_args)


@contextmanager
def spawned(command: list[str], port: int, log_path: Path, startup_timeout_s: float):
    """Runs `command`, waits until GET /health answers 200, yields the /v1 base URL; always stops the process."""
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        # Its own session, so a terminal's Ctrl-C reaches only us and we stop it in order.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{command[0]} did not become healthy on {url} (see {log_path}):\n{tail}")
            time.sleep(0.25)
        yield url + "/v1"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


# --- output ----------------------------------------------------------------------------------------------------

def machine_facts() -> dict:
    from ironlm.hardware import cpu_info

    info = cpu_info()
    return {"cpu_model": info.model_name, "physical_cores": info.physical_cores, "logical_cpus": info.logical_cpus,
            "memory_bytes": info.memory_bytes}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for run in report["runs"]:
        for level in run["levels"]:
            if level.get("timed_out"):
                rows.append([run["engine"], str(level["clients"]), "timed out", "", "", "", "", ""])
                continue
            rows.append([run["engine"], str(level["clients"]), _fmt(level["output_tokens_per_s"], ".1f"),
                         _fmt(level["ttft_p50_s"], ".2f"), _fmt(level["ttft_p90_s"], ".2f"),
                         _fmt(level["itl_p50_ms"], ".1f"), f"{level['completed']}/{level['requests']}",
                         str(level["errors"])])
    return rows


HEADERS = ["engine", "clients", "output tok/s", "TTFT p50 s", "TTFT p90 s", "ITL p50 ms", "completed", "errors"]


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    settings = report["settings"]
    table = Table(title=f"streaming chat, {settings['max_tokens']} new tokens per request, "
                        f"best of {settings['repeats']} repeat(s)")
    for header in HEADERS:
        table.add_column(header, justify="left" if header == "engine" else "right")
    for row in table_rows(report):
        table.add_row(*row)
    Console().print(table)


def markdown_table(report: dict) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table_rows(report)])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("output_tokens_per_s", "output tokens/s (all clients)"), ("ttft_p50_s", "median time to first token (s)"),
              ("itl_p50_ms", "median inter-token latency (ms)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.3))
    for ax, (key, title) in zip(axes, panels):
        for run in report["runs"]:
            points = [(lv["clients"], lv[key]) for lv in run["levels"] if lv.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=run["engine"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["settings"]["clients"], [str(c) for c in report["settings"]["clients"]])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- command line ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--spawn", nargs="+", action="append", default=[], metavar="ENGINE",
                   help="start a server on a free loopback port: 'ironlm', or 'llama-server PATH_TO_BINARY' "
                        "(needs --gguf); repeat for a side-by-side")
    p.add_argument("--url", action="append", default=[], help="base URL of a running server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="ironlm: model for --spawn ironlm (default: the embedded SmolLM2-135M)")
    p.add_argument("--gguf", help="llama-server: the .gguf file")
    p.add_argument("--threads", type=int, help="threads for spawned servers (default: each engine's own)")
    p.add_argument("--llama-server-args", default="", help="more llama-server arguments, e.g. '--poll 0'")
    p.add_argument("--ironlm-args", default="", help="more `ironlm serve` arguments, e.g. '--enforce-eager'")
    p.add_argument("--parallel", type=int, default=16, help="llama-server parallel slots, -np (default 16)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="ironlm sequences decoded together (default 64)")
    p.add_argument("--ctx-per-slot", type=int, help="context per sequence (llama-server default 1024; ironlm: the model's)")
    p.add_argument("--model-name", default="default", help="the 'model' field of each request (default 'default')")
    p.add_argument("--clients", default="1,4,16,64", help="comma-separated client counts (default 1,4,16,64)")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in turn (default 2)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (default 128)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (for servers that reject unknown fields)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's top_p (default 1: off)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds for a spawned server to get healthy")
    p.add_argument("--time-limit", type=float, default=1800.0, help="seconds for the whole run (default 1800)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every engine this many times, alternating; the best repeat is reported (default 1)")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--plot", type=Path, help="write a PNG of throughput and latency against clients here")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = p.parse_args(argv)
    try:
        args.clients = sorted({int(c) for c in args.clients.split(",")})
    except ValueError:
        p.error(f"--clients {args.clients!r} is not a comma-separated list of integers, e.g. 1,4,16")
    if not args.clients or min(args.clients) < 1 or args.requests_per_client < 1 or args.max_tokens < 1 or args.repeats < 1:
        p.error("--clients, --requests-per-client, --max-tokens and --repeats must be positive")
    for spawn in args.spawn:
        if spawn == ["ironlm"]:
            continue
        if spawn[0] != "llama-server" or len(spawn) != 2:
            p.error(f"--spawn {' '.join(spawn)}: use '--spawn ironlm' or '--spawn llama-server PATH_TO_BINARY'")
        if not Path(spawn[1]).is_file() or not args.gguf:
            p.error(f"--spawn llama-server needs an existing binary (got {spawn[1]}) and --gguf FILE")
    if not args.spawn and not args.url:
        p.error("give --spawn ENGINE or --url URL (or several)")
    return args


def best_of_repeats(raw_runs: list[dict]) -> list[dict]:
    """Per engine and client count, the repeat with the highest throughput (noise on a shared machine only slows),
    with every repeat's throughput kept in `output_tokens_per_s_repeats`."""
    by_engine: dict[str, dict[int, list[dict]]] = {}
    for run in raw_runs:
        levels = by_engine.setdefault(run["engine"], {})
        for level in run["levels"]:
            levels.setdefault(level["clients"], []).append(level)
    runs = []
    for engine, levels in by_engine.items():
        best = []
        for clients in sorted(levels):
            measured = [lv for lv in levels[clients] if not lv.get("timed_out")]
            if not measured:
                best.append({"clients": clients, "timed_out": True})
                continue
            level = dict(max(measured, key=lambda lv: lv["output_tokens_per_s"]))
            level["output_tokens_per_s_repeats"] = [lv["output_tokens_per_s"] for lv in measured]
            best.append(level)
        runs.append({"engine": engine, "levels": best})
    return runs


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.time_limit
    report = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": shlex.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "machine": machine_facts(),
              "settings": {"clients": args.clients, "requests_per_client": args.requests_per_client,
                           "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
                           "temperature": args.temperature, "top_p": args.top_p,
                           "threads": args.threads, "repeats": args.repeats},
              "runs": [], "raw_runs": []}
    log_dir = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    for repeat in range(args.repeats):
        # Engines alternate within each repeat, so slow phases of a shared machine hit them alike.
        for spawn in args.spawn:
            kind = spawn[0]
            port = free_port()
            command = server_command(kind, spawn[1] if len(spawn) > 1 else None, port, args)
            print(f"{kind} (repeat {repeat + 1}/{args.repeats}): {' '.join(command)}", file=sys.stderr, flush=True)
            run = {"engine": kind, "repeat": repeat, "server_command": command, "levels": []}
            try:
                with spawned(command, port, log_dir / f"{kind}-{repeat}.log", args.startup_timeout) as base_url:
                    run["levels"] = asyncio.run(run_engine(base_url, args, deadline))
            except RuntimeError as e:  # keep the other engines' results
                run["error"] = str(e)
                print(f"{kind} failed: {e}", file=sys.stderr, flush=True)
            report["raw_runs"].append(run)
        for url in args.url:
            print(f"{url} (repeat {repeat + 1}/{args.repeats}):", file=sys.stderr, flush=True)
            levels = asyncio.run(run_engine(url.rstrip("/"), args, deadline))
            report["raw_runs"].append({"engine": url, "repeat": repeat, "server_command": None, "levels": levels})
    report["runs"] = best_of_repeats(report["raw_runs"])
    print_table(report)
    if args.markdown:
        print(markdown_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so spawned servers are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; spawned servers were stopped", file=sys.stderr)
        sys.exit(130)
