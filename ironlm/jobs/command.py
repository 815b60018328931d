"""`ironlm batch` and `ironlm summarize`: resumable bulk jobs over the engine.

Both append one JSON line per finished item to OUTPUT (or to the error file when the item failed) and keep
a manifest next to OUTPUT. Running the same command again skips what is finished and continues. The order of
the lines is the order items finish, not the input order; match them by custom_id.

Exit status: 0 every item succeeded; 2 bad input or a refused run (nothing was generated); 3 the job is
complete but some items are in the error file; 130 interrupted (run the same command to continue).
(1 stays what Python gives an unexpected crash, so a script can tell it from failed items.)
"""
import argparse
import contextlib
import hashlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ironlm.cli import add_engine_arguments, engine_options
from ironlm.errors import IronlmError

EXIT_OK, EXIT_REFUSED, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True,
                        help="results, one JSON line per item, appended in the order items finish (not input order)")
    parser.add_argument("--errors", help="failed items, one JSON line each (default: OUTPUT with .errors.jsonl)")
    parser.add_argument("-m", "--model", help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: best for this CPU)")
    parser.add_argument("--quant", default="auto", choices=["auto", "none", "int8", "int4", "int4_sym", "bf16"],
                        help="linear weight format (default auto: GGUF blocks as stored, dense weights in bf16)")
    add_engine_arguments(parser)
    parser.add_argument("--threads", type=int, help="threads (default: physical cores)")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (default 64)")
    parser.add_argument("--force", action="store_true",
                        help="continue even if the input, model or parameters differ from the run that made OUTPUT "
                             "(results already there are kept; delete OUTPUT to start over)")
    parser.add_argument("--sync-every", type=int, default=8,
                        help="flush and fsync the output every this many items (default 8; also every 2 s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary table")
    parser.add_argument("--shard", metavar="K/N",
                        help="do only shard K of N (0 <= K < N) of the items, chosen by a hash of custom_id: N "
                             "processes, one per socket say, share a job, each with its own -o")


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `ironlm batch INPUT.jsonl -o OUTPUT.jsonl [--errors ERRORS.jsonl] [-m MODEL]`."""
    parser.add_argument("input", help="OpenAI Batch input file (JSONL: custom_id, method, url, body)")
    _add_common_arguments(parser)


def add_summarize_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `ironlm summarize PATH... -o OUT.jsonl`."""
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".txt, .md or .jsonl files, or folders of them")
    _add_common_arguments(parser)
    parser.add_argument("--text-field", default="text",
                        help="field holding the text in .jsonl records (default text; note.text for a nested one)")
    parser.add_argument("--id-field", default="id",
                        help="field naming a .jsonl record (default id, else PATH:LINE; patient.id for a nested one)")
    parser.add_argument("--lang", choices=["auto", "en", "zh"], default="auto",
                        help="language of the built-in prompts (default: detected per document)")
    parser.add_argument("--template", help="file with your own summary prompt; {text} marks where the text goes")
    parser.add_argument("--json-schema", metavar="SCHEMA",
                        help="summaries as JSON objects matching this schema (a .json file, or its JSON text); "
                             "each record then has them parsed under 'data'")
    parser.add_argument("--max-summary-tokens", type=int, default=256, help="tokens per summary (default 256)")
    parser.add_argument("--max-chunks", type=int, default=200,
                        help="documents needing more chunks than this fail instead (default 200)")
    parser.add_argument("--chunk-tokens", type=int, help="largest chunk in tokens (default: what the context allows)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, reproducible (default 0)")
    parser.add_argument("--repetition-penalty", type=float, default=1.1, help="(default 1.1)")
    parser.add_argument("--seed", type=int)


def run_batch(args: argparse.Namespace) -> int:
    """Runs an OpenAI Batch file; see the module docstring for the exit status."""
    from ironlm.jobs.resume import job_lock

    output, errors = _output_paths(args)
    shard = Shard.parse(args.shard)
    with job_lock(output):  # before the model loads: a refusal comes at once
        return _batch(args, output, errors, shard)


def _batch(args: argparse.Namespace, output: Path, errors: Path, shard: "Shard") -> int:
    from ironlm.jobs.batch_file import check_batch_file, format_problems, iter_batch_items, output_line
    from ironlm.jobs.body import failure_line, prepare_body, response_body
    from ironlm.jobs.runner import Task
    from ironlm.server import protocol
    from ironlm.server.translate import TokenTexts

    input_path = Path(args.input)
    llm = _load(args, output)
    names = (llm.model_name, "default")
    check = check_batch_file(input_path, names)
    if check.problems:
        for line in format_problems(input_path, check):
            print(line, file=sys.stderr)
        raise IronlmError(f"{input_path} has {check.num_problems} bad line(s); fix them and run again")
    params = {"model_name": llm.model_name, "dtype": llm.engine.dtype_name, "quant": args.quant,
              "kv_cache_dtype": llm.engine.kv_dtype_name, "max_model_len": llm.engine.max_model_len}
    manifest = {"kind": "batch", "input_sha256": check.sha256, "model_sha256": _model_hash(llm),
                "params": shard.record(_with_template(params, llm))}
    engine = llm.engine
    token_texts = TokenTexts(llm.tokenizer)
    num_items = check.num_items if shard.count == 1 else sum(
        1 for item in iter_batch_items(input_path) if shard.takes(item.custom_id))

    def make_task(item) -> Task:
        def start():
            prepared = prepare_body(item.url, item.body, llm.tokenizer, engine.max_model_len, llm.model_name,
                                    engine.grammar)
            results = yield prepared.requests
            body = response_body(prepared, llm.model_name, results,
                                 protocol.new_id("chatcmpl" if prepared.kind == "chat" else "cmpl"), protocol.now(),
                                 token_texts)
            return output_line(item.custom_id, body)
        return Task(item.custom_id, start)

    return _run_job(f"batch {input_path.name}{shard.label}", llm, output, errors, manifest, args, num_items,
                    lambda done: (make_task(item) for item in iter_batch_items(input_path, done)
                                  if shard.takes(item.custom_id)),
                    failure_line)


def run_summarize(args: argparse.Namespace) -> int:
    """Summarises documents (map-reduce for long ones); see the module docstring for the exit status."""
    from ironlm.jobs.resume import job_lock

    output, errors = _output_paths(args)
    shard = Shard.parse(args.shard)
    with job_lock(output):
        return _summarize(args, output, errors, shard)


def _summarize(args: argparse.Namespace, output: Path, errors: Path, shard: "Shard") -> int:
    from ironlm.grammar import read_schema
    from ironlm.jobs.resume import lock_path, manifest_path
    from ironlm.jobs.summarize import SummarySettings, Summarizer, failure_record, scan_documents
    from ironlm.sampling import SamplingParams

    template = None
    if args.template is not None:
        try:
            template = Path(args.template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise IronlmError(f"cannot read the template {args.template}: {exc}") from None
    for name in ("max_summary_tokens", "max_chunks"):
        if getattr(args, name) < 1:
            raise IronlmError(f"--{name.replace('_', '-')} must be at least 1")
    json_schema = None if args.json_schema is None else read_schema(args.json_schema)
    job_files = frozenset({output, errors, manifest_path(output), lock_path(output)})
    scan = scan_documents(args.paths, args.text_field, args.id_field, job_files)
    if scan.skipped and not args.quiet:
        names = ", ".join(str(p) for p in scan.skipped[:3]) + (", ..." if len(scan.skipped) > 3 else "")
        print(f"note: passing over {len(scan.skipped)} file(s) that are ironlm job results: {names}",
              file=sys.stderr)
    if scan.problems:
        for line in scan.problems[:20]:
            print(line, file=sys.stderr)
        raise IronlmError(f"{scan.num_problems} problem(s) in the input documents; fix them and run again")
    llm = _load(args, output)
    settings = SummarySettings(
        lang=None if args.lang == "auto" else args.lang, max_summary_tokens=args.max_summary_tokens,
        max_chunks=args.max_chunks, chunk_tokens=args.chunk_tokens, text_field=args.text_field, map_template=template,
        json_schema=json_schema, params=SamplingParams(temperature=args.temperature,
                                                       repetition_penalty=args.repetition_penalty, seed=args.seed))
    summarizer = Summarizer(llm.tokenizer, llm.engine.max_model_len, settings)
    params = {"model_name": llm.model_name, "dtype": llm.engine.dtype_name, "quant": args.quant,
              "kv_cache_dtype": llm.engine.kv_dtype_name, "max_model_len": llm.engine.max_model_len,
              "lang": args.lang, "template": template, "max_summary_tokens": args.max_summary_tokens,
              "max_chunks": args.max_chunks, "chunk_tokens": args.chunk_tokens, "text_field": args.text_field,
              "id_field": args.id_field, "temperature": args.temperature,
              "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    if json_schema is not None:  # only then: outputs of earlier versions keep resuming
        params["json_schema"] = json_schema
    manifest = {"kind": "summarize", "input_sha256": scan.sha256, "model_sha256": _model_hash(llm),
                "params": shard.record(_with_template(params, llm))}
    documents = [doc for doc in scan.documents if shard.takes(doc.custom_id)]
    by_id = {doc.custom_id: doc for doc in documents}
    return _run_job(f"summarize{shard.label}", llm, output, errors, manifest, args, len(documents),
                    lambda done: (summarizer.task(d) for d in documents if d.custom_id not in done),
                    lambda key, exc: failure_record(by_id[key], exc))


# --- shared by both ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the items whose custom_id hashes to it. A hash, not the line number, so an
    item stays in its shard when lines are added or moved (a --force run after an input change)."""

    index: int = 0
    count: int = 1

    @staticmethod
    def parse(text: str | None) -> "Shard":
        if text is None:
            return Shard()
        index, slash, count = text.partition("/")
        if not (slash and index.strip().isdigit() and count.strip().isdigit() and int(index) < int(count)):
            raise IronlmError(f"--shard takes K/N with 0 <= K < N (0/2 and 1/2 split a job in two); got {text!r}")
        return Shard(int(index), int(count))

    def takes(self, custom_id: str) -> bool:
        if self.count == 1:
            return True
        digest = hashlib.blake2b(custom_id.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.count == self.index

    def record(self, params: dict) -> dict:
        """The manifest's parameters: a sharded job records its shard (an unsharded one stays as before)."""
        return params if self.count == 1 else {**params, "shard": f"{self.index}/{self.count}"}

    @property
    def label(self) -> str:
        return "" if self.count == 1 else f" (shard {self.index}/{self.count})"


def _output_paths(args) -> tuple[Path, Path]:
    from ironlm.jobs.resume import default_errors_path

    output = Path(args.output)
    errors = Path(args.errors) if args.errors else default_errors_path(output)
    if output.resolve() == errors.resolve():
        raise IronlmError(f"--errors must differ from --output ({output})")
    for path in (output, errors):
        if not path.parent.is_dir():
            raise IronlmError(f"the folder of {path} does not exist; create it first")
    if args.sync_every < 1:
        raise IronlmError("--sync-every must be at least 1")
    return output, errors


def _load(args, output: Path):
    from ironlm import LLM
    from ironlm.jobs.resume import recorded_max_model_len

    kwargs = {"max_num_seqs": args.max_num_seqs}
    # A resumed job asks for the context length its first run had. Where the KV cache's memory bounded that
    # length, it moves with the memory free at load, and the job's prompts (summaries' chunks, default max_tokens)
    # followed it; --force is for changed settings, so it takes the new ones.
    max_model_len = args.max_model_len if args.max_model_len is not None or args.force else (
        recorded_max_model_len(output))
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if args.max_num_seqs > 512:
        kwargs["max_num_batched_tokens"] = args.max_num_seqs
    return LLM(model=args.model, dtype=args.dtype, threads=args.threads, quant=args.quant, **engine_options(args),
               **kwargs)


def _with_template(params: dict, llm) -> dict:
    """A --chat-template changes every prompt, so the manifest records its hash (only then: outputs made without
    one keep resuming)."""
    template = llm.config.chat_template
    if template is None:
        return params
    return {**params, "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest()}


def _model_hash(llm) -> str:
    from ironlm.formats import default_model_path
    from ironlm.jobs.resume import model_hash

    return model_hash(Path(llm.config.model) if llm.config.model is not None else default_model_path())


def _run_job(title: str, llm, output: Path, errors: Path, manifest: dict, args, num_total: int,
             make_tasks: Callable[[set[str]], Iterator], failure: Callable[[str, BaseException], dict]) -> int:
    try:
        return _run_resumable(title, llm, output, errors, manifest, args, num_total, make_tasks, failure)
    except OSError as exc:  # disk full, permissions, a file removed under us: one line, results so far kept
        raise IronlmError(f"{exc.filename or output}: {exc.strerror or exc}; finished items are saved, "
                          f"fix this and run the same command again") from None


def _run_resumable(title, llm, output, errors, manifest, args, num_total, make_tasks, failure) -> int:
    from ironlm.jobs.progress import JobProgress
    from ironlm.jobs.resume import DurableAppender, check_manifest, finished_ids, repair_torn_tail
    from ironlm.jobs.runner import JobRunner

    check_manifest(output, manifest, args.force)
    for path in (output, errors):
        repair_torn_tail(path)
    done = finished_ids(output, errors)
    num_skipped = len(done)  # with --force after an input change, some may no longer be in the input
    runner = JobRunner(llm.engine)
    interrupted = False
    with (DurableAppender(output, args.sync_every) as out, DurableAppender(errors, args.sync_every) as err,
          JobProgress(title, num_total, min(num_skipped, num_total), args.quiet) as progress, _sigterm_as_interrupt()):
        try:
            runner.run(make_tasks(done), lambda key, record: out.append(record),
                       lambda key, exc: err.append(failure(key, exc)), progress.update)
        except KeyboardInterrupt:
            interrupted = True
    num_failed = len(finished_ids(errors))
    progress.summary([("output", str(output)), ("errors", f"{errors} ({num_failed:,} items)")], interrupted)
    if interrupted:
        print(f"interrupted; finished items are saved in {output}. Run the same command again to continue.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_SOME_FAILED if num_failed else EXIT_OK


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (e.g. from a scheduler) stops the job as Ctrl-C does: finished items stay saved."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """`python -m ironlm.jobs.command batch|summarize ...`, the same as `ironlm batch|summarize ...`."""
    parser = argparse.ArgumentParser(prog="python -m ironlm.jobs.command")
    sub = parser.add_subparsers(dest="command", required=True)
    add_batch_arguments(sub.add_parser("batch", help="run an OpenAI Batch file"))
    add_summarize_arguments(sub.add_parser("summarize", help="summarise documents"))
    args = parser.parse_args(argv)
    try:
        return run_batch(args) if args.command == "batch" else run_summarize(args)
    except IronlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
