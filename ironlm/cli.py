"""The `ironlm` command. Subcommands import their modules lazily so `ironlm --help` stays instant."""
import argparse
import importlib
import sys

from ironlm.errors import IronlmError

# Subcommands that live in their own module: (module, help, function adding arguments, function running).
EXTERNAL_COMMANDS = {
    "info": ("ironlm.info_command", "describe this machine (and a model) and what ironlm will use",
             "add_arguments", "run"),
    "bench": ("ironlm.bench.command", "measure speed against this machine's limits", "add_arguments", "run"),
    "serve": ("ironlm.server.command", "OpenAI-compatible HTTP server", "add_arguments", "run"),
    "convert": ("ironlm.convert", "pack a model's weights as int8, int4, int4_sym or bf16 for ironlm's kernels",
                "add_arguments", "run"),
    "batch": ("ironlm.jobs.command", "run an OpenAI Batch file (JSONL), resumably", "add_batch_arguments",
              "run_batch"),
    "summarize": ("ironlm.jobs.command", "summarise documents (.txt, .md, .jsonl), resumably",
                  "add_summarize_arguments", "run_summarize"),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: best for this CPU)")
    parser.add_argument("--threads", type=int, help="threads (default: physical cores)")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--quant", default="auto", choices=["auto", "none", "int8", "int4", "int4_sym", "bf16"],
                        help="linear weight format: auto keeps GGUF Q4_0/Q4_1/Q8_0 blocks as stored and runs other "
                             "weights in bf16 with ironlm's kernels; none uses torch; or quantize at load")
    add_engine_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    from ironlm.config import KV_CACHE_DTYPES
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="KV cache element type: auto is bfloat16, or float32 with --dtype float32; int8 (a scale "
                             "per row) holds about twice the tokens of bfloat16 in the same memory")
    parser.add_argument("--kv-cache-memory", type=memory_size, metavar="SIZE",
                        help="most memory the KV cache may take, e.g. 8G or 512M (default: half the memory "
                             "available at load, less the model's weights)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every decode step from Python instead of replaying its recorded kernel calls "
                             "(same results, slower on small models; for debugging)")
    parser.add_argument("--prompt-lookup", type=int, metavar="K",
                        help="speculative decoding from the text itself: when the last tokens written appeared "
                             "before, compute up to K tokens that followed them with the next one, and keep those the "
                             "model agrees with; faster where few sequences decode, most where answers quote their "
                             "prompt (default 4; 0: off)")
    parser.add_argument("--chat-template", metavar="FILE",
                        help="a Jinja chat template (a file, or the template's text) to use instead of the model's "
                             "own: for a model file without one, or one that renders tools")


def engine_options(args: argparse.Namespace) -> dict:
    """The EngineConfig fields that add_engine_arguments' flags give."""
    options = {"kv_cache_dtype": args.kv_cache_dtype, "kv_cache_bytes": args.kv_cache_memory,
               "enforce_eager": args.enforce_eager, "chat_template": read_chat_template(args.chat_template)}
    return options if args.prompt_lookup is None else {**options, "prompt_lookup": args.prompt_lookup}


def memory_size(text: str) -> int:
    """--kv-cache-memory: bytes from '8G', '512M', '1.5GiB' or a plain number of bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = number[-1:] if number[-1:] in units else ""
    try:
        value = float(number[: len(number) - len(unit)]) * units[unit]
    except ValueError:
        value = 0.0
    if not 1 << 20 <= value < 1 << 60:  # also NaN and infinity
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size of at least 1M; give e.g. 8G or 512M")
    return int(value)


def read_chat_template(given: str | None) -> str | None:
    """--chat-template: the text of a template file, or the template itself when it holds Jinja tags."""
    from pathlib import Path

    from ironlm.errors import IronlmError
    if given is None or "{{" in given or "{%" in given:
        return given
    try:
        return Path(given).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IronlmError(f"cannot read the chat template file {given}: {exc}; give a Jinja file or the template's "
                          f"text") from None


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (default 0.2)")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.1,
                        help="1.0 = off; the default 1.1 (as Ollama's) keeps small models out of loops")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace):
    from ironlm.sampling import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def load_llm(args: argparse.Namespace, **engine_settings):
    """The LLM that add_model_arguments' flags describe; engine_settings are further EngineConfig fields."""
    from ironlm import LLM
    return LLM(model=args.model, dtype=args.dtype, threads=args.threads, max_model_len=args.max_model_len,
               quant=args.quant, **engine_options(args), **engine_settings)


def json_schema_arg(args: argparse.Namespace) -> dict | None:
    """--json-schema (a file, or the schema's JSON text) or --json (any JSON object) as a schema; None without."""
    from ironlm.grammar import read_schema

    if args.json_schema is None:
        return {"type": "object"} if args.json else None
    return read_schema(args.json_schema)


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_params(args)
    params.json_schema = json_schema_arg(args)
    params.validate()
    llm = load_llm(args)
    use_chat = not args.raw and llm.tokenizer.chat_template is not None
    tokens = llm.chat_prompt([{"role": "user", "content": prompt}]) if use_chat else llm.tokenizer.encode(prompt)
    if args.stream:
        for out in llm.stream(tokens, params):
            print(out.new_text, end="", flush=True)
        print()
    else:
        print(llm.generate({"prompt_token_ids": tokens}, params)[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    params.validate()
    llm = load_llm(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"ironlm chat with {llm.model_name}. /reset clears the conversation, /exit or Ctrl-D leaves.")

    def read_line() -> str | None:
        try:
            return input("> " if interactive else "")
        except EOFError:
            return None

    chat_loop(llm, read_line, params, args.system)
    return 0


def chat_loop(llm, read_line, params, system: str | None = None) -> list[dict]:
    """Reads user turns until None or /exit, streams each reply, and keeps the conversation; returns it. A
    reasoning model's thinking goes to standard error and stays out of the conversation."""
    from ironlm import reasoning

    thinks = reasoning.template_thinks(llm.tokenizer.chat_template)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while (line := read_line()) is not None:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        prompt = llm.chat_prompt(messages)
        thoughts = reasoning.Stream(reasoning.ids_think(llm.tokenizer, prompt)) if thinks else None

        def show(thought: str, text: str) -> None:
            print(thought, end="", file=sys.stderr, flush=True)
            print(text, end="", flush=True)
            reply.append(text)

        for out in llm.stream(prompt, params):
            show(*(thoughts.feed(out.new_text) if thoughts else ("", out.new_text)))
        if thoughts:
            show(*thoughts.finish())
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return messages


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ironlm", description="LLM inference on the CPUs people already own")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a reply to one prompt")
    gen.add_argument("prompt", help="the prompt, or - to read it from standard input")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--json-schema", metavar="SCHEMA",
                     help="answer in JSON matching this schema: a .json file, or the schema's JSON text")
    gen.add_argument("--json", action="store_true", help="answer with a JSON object (any keys)")
    add_model_arguments(gen)
    add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat that keeps the conversation (works with piped stdin)")
    chat.add_argument("--system", help="system prompt")
    add_model_arguments(chat)
    add_sampling_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    for name, (_, help_text, _, _) in EXTERNAL_COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # External subcommands add their own arguments; resolve the module first, then parse fully.
    if argv and argv[0] in EXTERNAL_COMMANDS:
        module_name, help_text, add_name, run_name = EXTERNAL_COMMANDS[argv[0]]
        module = importlib.import_module(module_name)
        sub = argparse.ArgumentParser(prog=f"ironlm {argv[0]}", description=help_text)
        getattr(module, add_name)(sub)
        args = sub.parse_args(argv[1:])
        func = getattr(module, run_name)
    else:
        args = parser.parse_args(argv)
        func = args.func
    try:
        return func(args)
    except IronlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
