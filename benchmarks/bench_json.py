"""Structured output: time and engine steps of JSON-schema answers, with the tokens the grammar forces appended
unsampled (the engine's fast-forward) and token by token.

    python benchmarks/bench_json.py [--model PATH] [--prompts 1] [--max-tokens 96] [--repeats 3] [--tool-call]

Each prompt asks for four fields of a synthetic patient note (an integer, a string of at most 60 characters, a
boolean and an enum), greedy. "token by token" gives the same grammar to a processor that offers no forced
tokens, so every token is sampled under the mask. The two modes take turns, best of --repeats each. With a
random-weight model (a --model-shape directory's GGUF), the answers are nonsense but the grammar holds them to
the same shape. --tool-call asks for the same fields as the arguments of a function call that tool_choice forces
(the prompt then carries the tool, and the grammar the call's frame around the arguments).
"""

import argparse
import random
import time

from ironlm import LLM, SamplingParams  # before torch: ironlm sets OpenMP's wait policy
from ironlm.tools import read_tools, tool_set

SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"patient_age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "diagnosis": {"type": "string", "maxLength": 60},
                         "urgent": {"type": "boolean"},
                         "ward": {"enum": ["cardiology", "oncology", "general medicine"]}},
          "required": ["patient_age", "diagnosis", "urgent", "ward"]}


def note(rng: random.Random) -> str:
    symptom = rng.choice(["chest pain", "fever and cough", "shortness of breath", "abdominal pain"])
    return (f"Patient aged {rng.randint(20, 95)}. Presented with {symptom} for {rng.randint(1, 14)} days. "
            f"Temperature {rng.uniform(36.0, 39.5):.1f} C, heart rate {rng.randint(55, 120)}. "
            f"Plan: {rng.choice(['admit for observation', 'discharge with follow-up', 'refer to a specialist'])}.")


TOOL = {"type": "function", "function": {"name": "record_note", "description": "Files a patient note's fields",
                                         "parameters": SCHEMA}}


def run(llm: LLM, prompts: list[list[int]], max_tokens: int, fast_forward: bool,
        tools=None) -> tuple[float, int, int]:
    """(seconds, engine steps, generated tokens) for one pass over the prompts."""
    if tools is None:
        processors = llm.engine.grammar.compile(SCHEMA, len(prompts))
    else:
        processors = llm.engine.grammar.compile_lark(tools.grammar(None), len(prompts), "tools")
    if not fast_forward:  # the same masks, no forced tokens on offer
        processors = [lambda ids, logits, p=p: p(ids, logits) for p in processors]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, logits_processor=p) for p in processors]
    steps = llm.engine.num_steps
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return time.perf_counter() - start, llm.engine.num_steps - steps, sum(len(r.token_ids) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="GGUF or HF directory (default: the embedded 135M)")
    parser.add_argument("--prompts", type=int, default=1, help="prompts decoding together")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--tool-call", action="store_true", help="the fields as a forced function call's arguments")
    args = parser.parse_args()
    llm = LLM(args.model, threads=args.threads)
    tools = tool_set(*read_tools([TOOL], {"type": "function", "function": {"name": "record_note"}}), True,
                     llm.tokenizer) if args.tool_call else None
    rng = random.Random(0)
    ask = "File this patient note." if tools else "Extract the fields of this patient note as JSON."
    prompts = [llm.chat_prompt([{"role": "user", "content": ask + "\n\n" + note(rng)}], tools)
               for _ in range(args.prompts)]
    run(llm, prompts, args.max_tokens, True, tools)  # warm-up: grammar tables, decode graphs
    run(llm, prompts, args.max_tokens, False, tools)
    best: dict[bool, tuple[float, int, int]] = {}
    for _ in range(args.repeats):
        for fast_forward in (True, False):
            result = run(llm, prompts, args.max_tokens, fast_forward, tools)
            if fast_forward not in best or result[0] < best[fast_forward][0]:
                best[fast_forward] = result
    print(f"`python benchmarks/bench_json.py{' --model ' + args.model if args.model else ''} --prompts "
          f"{args.prompts} --max-tokens {args.max_tokens} --repeats {args.repeats}"
          f"{' --tool-call' if tools else ''}`, model {llm.model_name}, "
          f"{llm.engine.threads} threads, best of {args.repeats}, prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens:")
    print(f"{'mode':16} {'s':>7} {'steps':>6} {'tokens':>7} {'tok/s':>7}")
    for fast_forward in (True, False):
        seconds, steps, tokens = best[fast_forward]
        print(f"{'fast-forward' if fast_forward else 'token by token':16} {seconds:7.2f} {steps:6d} {tokens:7d} "
              f"{tokens / seconds:7.1f}")
    print(f"speed-up {best[False][0] / best[True][0]:.2f}x")


if __name__ == "__main__":
    main()
