"""`ironlm bench [MODEL]`: prefill and decode speed of a model on this machine, against the machine's roofline."""
import argparse
import gc
import sys
import time
from pathlib import Path

from ironlm.errors import IronlmError, ModelLoadError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ironlm.bench.shapes import SHAPES
    from ironlm.cli import add_model_arguments

    parser.add_argument("model_path", nargs="?", metavar="MODEL", help="same as -m/--model")
    add_model_arguments(parser)
    parser.add_argument("--model-shape", choices=list(SHAPES),
                        help="a random-weight model in this public shape (built once in ~/.cache/ironlm/shapes)")
    parser.add_argument("--prompt-lengths", type=_int_list, default=[128, 512, 2048], metavar="N,N,...",
                        help="prefill prompt lengths (default 128,512,2048)")
    parser.add_argument("--batches", type=_int_list, default=[1, 4, 16], metavar="B,B,...",
                        help="decode batch sizes (default 1,4,16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence in decode runs")
    parser.add_argument("--decode-prompt-tokens", type=int, default=32, help="prompt length for decode runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each figure")
    parser.add_argument("--sweep", choices=["threads"], help="also measure decode batch 1 and prefill at 1..N threads")
    parser.add_argument("--sweep-max-threads", type=int, default=None, help="N for --sweep threads (default: logical CPUs)")
    parser.add_argument("--sweep-prefill-tokens", type=int, default=512, help="prompt length for --sweep prefill")
    parser.add_argument("--remeasure", action="store_true", help="re-run the bandwidth and FLOP/s probes (else cached)")
    parser.add_argument("--probe-bytes", type=int, default=1 << 30, help="bandwidth probe buffer size (default 1 GiB)")
    parser.add_argument("--probe-iters", type=int, default=500_000, help="rounds of the FLOP/s micro-kernels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--plot", metavar="PNG", help="save tokens/s vs batch and vs prompt length with the roofline")


def _check(args: argparse.Namespace) -> None:
    for name in ("new_tokens", "decode_prompt_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise IronlmError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise IronlmError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.model_path and args.model and args.model_path != args.model:
        raise IronlmError(f"two models given ({args.model_path!r} and -m {args.model!r}); give one")
    if args.model_shape and (args.model_path or args.model):
        raise IronlmError("give either a model or --model-shape, not both")
    if args.threads is not None and args.threads < 1:
        raise IronlmError(f"--threads must be at least 1, got {args.threads}")


def _progress(done: int, total: int) -> None:
    print(f"\rwriting random weights: {done / 1e9:.2f} / {total / 1e9:.2f} GB", end="", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ironlm import LLM
    from ironlm.bench import harness, probes, report
    from ironlm.bench.shapes import build_shape_model
    from ironlm.cli import engine_options
    from ironlm.hardware import cpu_info, default_threads
    from ironlm.info_command import machine_facts

    _check(args)
    info = cpu_info()
    threads = args.threads or default_threads()
    model = args.model or args.model_path
    if model and not Path(model).exists():  # fail before spending seconds on the probes
        raise ModelLoadError(f"{model}: no such file or directory; pass a Hugging Face model directory or a .gguf file")
    if args.model_shape:
        model = str(build_shape_model(args.model_shape, progress=_progress))
        print(file=sys.stderr)

    def get_probe(t: int):
        return probes.get(t, remeasure=args.remeasure, bandwidth_bytes=args.probe_bytes, flop_iters=args.probe_iters,
                          info=info)

    probe = get_probe(threads)
    harness.reset_peak_rss()  # the probe's buffers are not the model's memory
    # no prompt-lookup drafts unless asked for: these figures are the kernels' and the engine's, on random prompts
    options = {"prompt_lookup": 0, **engine_options(args)}
    llm = LLM(model=model, dtype=args.dtype, threads=threads, quant=args.quant, **options,
              max_num_seqs=max(64, max(args.batches)))
    result = harness.bench_model(llm, probe, args.prompt_lengths, args.batches, args.decode_prompt_tokens,
                                 args.new_tokens, args.warmup, args.repeats, args.seed)
    peak_rss = harness.peak_rss_bytes()
    del llm
    gc.collect()
    out = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "ironlm bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "machine": machine_facts(),
        "probes": {
            "threads": probe.threads, "bandwidth_read_gb_s": probe.bandwidth_read_gb_s,
            "bandwidth_copy_gb_s": probe.bandwidth_copy_gb_s, "peak_gflop_s": probe.peak_gflop_s,
            "peak_kernels": probe.peak_kernels, "measured_at": probe.measured_at, "cached": probe.cached,
        },
        "method": {
            "warmup_runs": args.warmup, "repeats": args.repeats,
            "noisy_threshold_pct": 100 * harness.NOISY_SPREAD, "decode_prompt_tokens": args.decode_prompt_tokens,
            "decode_new_tokens": args.new_tokens, "roofline": "weights only; see ironlm/bench/harness.py",
        },
        "model_shape": args.model_shape,
        **result,
        "peak_rss_bytes": peak_rss,
    }
    if args.sweep == "threads":
        top = args.sweep_max_threads or info.logical_cpus
        out["sweep_threads"] = harness.sweep_threads(
            lambda t: LLM(model=model, dtype=args.dtype, threads=t, quant=args.quant, **options),
            list(range(1, top + 1)), get_probe,
            args.decode_prompt_tokens, args.new_tokens, args.sweep_prefill_tokens, args.warmup, args.repeats)
    if args.json:
        print(report.to_json(out))
    else:
        report.print_report(out)
    if args.plot:
        report.plot(out, args.plot)
        if not args.json:
            print(f"plot saved to {args.plot}")
    return 0
