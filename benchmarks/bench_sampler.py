"""Time of one sampler step over a batch of logits, and batched generation with and without sampling.

    python benchmarks/bench_sampler.py [--rows 16] [--vocab 49152] [--no-generate]

The sampler cases run on random logits; the generate cases run the embedded SmolLM2-135M on 16 prompts
of 32 tokens, 200 new tokens each (EOS ignored), greedy and with temperature 0.7 / top-p 0.95. The JSON-schema
case gives every row a response_format grammar (the server's and batch jobs') over the embedded model's
tokenizer, standing inside a string value, where most of a tagged answer's tokens are.
"""

import argparse
import time

from ironlm.sampling import Sampler, SampleState, SamplingParams, SeenTokens  # before torch: ironlm sets OpenMP's wait policy

import torch

# name -> (params, prompt tokens each row has seen: what the repetition penalty reads)
CASES = {
    "greedy": (SamplingParams(temperature=0.0), 0),
    "temperature 0.7": (SamplingParams(temperature=0.7), 0),
    "temperature 0.7, top-p 0.95": (SamplingParams(temperature=0.7, top_p=0.95), 0),
    "temperature 0.7, top-k 40, min-p 0.05": (SamplingParams(temperature=0.7, top_k=40, min_p=0.05), 0),
    "temperature 0.2, top-p 0.9 (CLI default)": (SamplingParams(temperature=0.2, top_p=0.9), 0),
    "greedy, repetition penalty 1.1, 1,500-token prompts (summarize)":
        (SamplingParams(temperature=0.0, repetition_penalty=1.1), 1500),
}


def sampler_ms(logits: torch.Tensor, params: SamplingParams, prompt_tokens: int, repeats: int) -> float:
    # As the engine calls it: each row's seen tokens kept across steps; the logits copied (the engine hands its
    # own over instead, which saves that copy too).
    sampler = Sampler()
    vocab = logits.shape[1]
    prompts = [torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(logits.shape[0])]
    states = [SampleState(params, prompt, [], torch.Generator().manual_seed(i), SeenTokens(prompt))
              for i, prompt in enumerate(prompts)]
    sampler(logits, states)
    start = time.perf_counter()
    for _ in range(repeats):
        sampler(logits, states)
    return (time.perf_counter() - start) / repeats * 1e3


def json_schema_ms(rows: int, repeats: int) -> float:
    from ironlm import LLM
    from ironlm.grammar import GrammarCompiler

    tokenizer = LLM(threads=1).tokenizer
    schema = {"type": "object", "properties": {"tag": {"enum": ["billing", "shipping", "other"]},
                                               "summary": {"type": "string"}}, "required": ["tag", "summary"]}
    processors = GrammarCompiler(tokenizer, tokenizer.vocab_size).compile(schema, rows)
    answer = tokenizer.encode('{"tag": "shipping", "summary": "The parcel is', add_special_tokens=False)
    states = [SampleState(SamplingParams(temperature=0.0, logits_processor=processor), [], answer, None)
              for processor in processors]
    logits = torch.randn(rows, tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    sampler = Sampler()
    sampler(logits, states)
    start = time.perf_counter()
    for _ in range(repeats):
        sampler(logits, states)
    return (time.perf_counter() - start) / repeats * 1e3


def generate_tok_s(temperature: float) -> float:
    from ironlm import LLM

    llm = LLM(threads=2, prompt_lookup=0)  # one sampled row per sequence a step, as before drafts
    params = SamplingParams(max_tokens=200, ignore_eos=True, temperature=temperature, top_p=0.95)
    prompts = [{"prompt_token_ids": list(range(1000 + 50 * i, 1032 + 50 * i))} for i in range(16)]
    llm.generate(prompts, params)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, params)
    return 16 * 200 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-generate", action="store_true", help="skip the model runs")
    args = parser.parse_args()
    # Peaked like a language model's next-token logits, so top-p stays among the likeliest tokens.
    logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, :8] += 12
    print(f"sampler step, {args.rows} rows x {args.vocab} logits:")
    for name, (params, prompt_tokens) in CASES.items():
        print(f"  {name:64} {sampler_ms(logits, params, prompt_tokens, args.repeats):7.2f} ms")
    print(f"  {'greedy, JSON schema (response_format), SmolLM2 tokenizer':64} "
          f"{json_schema_ms(args.rows, args.repeats):7.2f} ms")
    if not args.no_generate:
        print("LLM.generate, SmolLM2-135M, 16 prompts x 200 new tokens:")
        for temperature in (0.0, 0.7):
            label = "greedy" if temperature == 0 else f"temperature {temperature}, top-p 0.95"
            print(f"  {label:64} {generate_tok_s(temperature):7.0f} tok/s")


if __name__ == "__main__":
    main()
