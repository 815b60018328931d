"""Show bench results: a rich table for people, JSON for machines, a matplotlib plot with the roofline."""
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ironlm.errors import IronlmError


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} GB"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _spread(row: dict, key: str) -> str:
    text = f"{row[key + '_min']:,.1f}–{row[key + '_max']:,.1f}"
    return f"[yellow]{text} noisy[/yellow]" if row["noisy"] else text


def print_report(report: dict, console: Console | None = None) -> None:
    """Render a `ironlm bench` report (the dict that --json prints) as tables."""
    console = console or Console()
    probes, model = report["probes"], report["model"]
    peaks = ", ".join(f"{k} {_num(v, 0)}" for k, v in probes["peak_gflop_s"].items() if v) or "none measured"
    console.print(f"[bold]{report['machine']['cpu_model']}[/bold], {probes['threads']} threads: "
                  f"read {probes['bandwidth_read_gb_s']:.1f} GB/s, copy {probes['bandwidth_copy_gb_s']:.1f} GB/s, "
                  f"peak GFLOP/s {peaks}" + (" (cached; --remeasure to refresh)" if probes.get("cached") else ""))
    console.print(f"[bold]{model['name']}[/bold] ({model['format']}, {model['dtype']}, {model['threads']} threads): "
                  f"{model['num_params'] / 1e6:,.1f} M params, {_gb(model['weight_bytes'])} of weights, "
                  f"{_gb(model['weight_bytes_per_token'])} read per token ({model['weight_bytes_note']}); "
                  "matmul weights: " + ", ".join(f"{k} x{v}" for k, v in model["num_matmuls_by_format"].items()))
    if report.get("prefill"):
        table = Table(title=f"Prefill (roofline: {report['compute_peak_dtype']} peak)")
        for col in ("prompt tokens", "tok/s", "min–max", "TTFT s", "roofline tok/s", "bound", "% of roofline"):
            table.add_column(col, justify="right")
        for row in report["prefill"]:
            if "skipped" in row:
                table.add_row(str(row["prompt_tokens"]), "-", row["skipped"], "", "", "", "")
                continue
            table.add_row(str(row["prompt_tokens"]), _num(row["prefill_tok_s"]), _spread(row, "prefill_tok_s"),
                          _num(row["ttft_s"], 3), _num(row["roofline_tok_s"]), row["roofline_bound"],
                          _num(row["roofline_pct"]))
        console.print(table)
    if report.get("decode"):
        table = Table(title=f"Decode ({report['method']['decode_prompt_tokens']}-token prompts, "
                            f"{report['method']['decode_new_tokens']} new tokens each)")
        for col in ("batch", "tok/s", "min–max", "tok/s per seq", "TTFT s", "roofline tok/s", "bound", "% of roofline"):
            table.add_column(col, justify="right")
        for row in report["decode"]:
            table.add_row(str(row["batch"]), _num(row["decode_tok_s"]), _spread(row, "decode_tok_s"),
                          _num(row["per_sequence_tok_s"]), _num(row["ttft_s"], 3), _num(row["roofline_tok_s"]),
                          row["roofline_bound"], _num(row["roofline_pct"]))
        console.print(table)
    sweep = report.get("sweep_threads")
    if sweep:
        table = Table(title="Thread sweep")
        for col in ("threads", "decode tok/s (batch 1)", "% of roofline", f"prefill tok/s ({sweep['rows'][0]['prefill_tokens']})",
                    "% of roofline"):
            table.add_column(col, justify="right")
        for row in sweep["rows"]:
            table.add_row(str(row["threads"]), _num(row["decode_tok_s"]), _num(row["decode_roofline_pct"]),
                          _num(row["prefill_tok_s"]), _num(row["prefill_roofline_pct"]))
        console.print(table)
        console.print(f"Best threads: decode {sweep['best_threads_decode']}, prefill {sweep['best_threads_prefill']}")
    console.print(f"Peak RSS: {_gb(report['peak_rss_bytes'])}. Figures are medians of {report['method']['repeats']} "
                  f"runs after {report['method']['warmup_runs']} warm-up; 'noisy' = spread > "
                  f"{report['method']['noisy_threshold_pct']:.0f} % of the median.")


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False)


def plot(report: dict, path: str | Path) -> None:
    """Tokens/s against batch size and against prompt length, each with its roofline, saved as an image."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise IronlmError("--plot needs matplotlib; install it with `pip install matplotlib` (or ironlm[plot])")
    fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    decode = report.get("decode") or []
    if decode:
        b = [r["batch"] for r in decode]
        ax_d.errorbar(b, [r["decode_tok_s"] for r in decode],
                      yerr=[[r["decode_tok_s"] - r["decode_tok_s_min"] for r in decode],
                            [r["decode_tok_s_max"] - r["decode_tok_s"] for r in decode]], marker="o", label="measured")
        ax_d.plot(b, [r["roofline_tok_s"] for r in decode], "k--", label="roofline")
        ax_d.set_xscale("log", base=2)
    ax_d.set(title="Decode", xlabel="batch (sequences)", ylabel="tokens/s")
    prefill = [r for r in report.get("prefill") or [] if "skipped" not in r]
    if prefill:
        L = [r["prompt_tokens"] for r in prefill]
        ax_p.errorbar(L, [r["prefill_tok_s"] for r in prefill],
                      yerr=[[r["prefill_tok_s"] - r["prefill_tok_s_min"] for r in prefill],
                            [r["prefill_tok_s_max"] - r["prefill_tok_s"] for r in prefill]], marker="o", label="measured")
        ax_p.plot(L, [r["roofline_tok_s"] for r in prefill], "k--", label="roofline")
        ax_p.set_xscale("log", base=2)
    ax_p.set(title="Prefill", xlabel="prompt tokens", ylabel="tokens/s")
    for ax in (ax_d, ax_p):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    model = report["model"]
    fig.suptitle(f"{model['name']} ({model['dtype']}, {model['threads']} threads) on {report['machine']['cpu_model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
