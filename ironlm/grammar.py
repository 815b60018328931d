"""Output constrained to a JSON schema: sampling masked by an llguidance grammar.

llguidance (no torch dependency) compiles a JSON schema into a token-level matcher; each step the matcher gives
the set of tokens that keep the output valid, and every other logit is set to -inf. Used by
SamplingParams.json_schema (the Python API and `ironlm generate --json-schema`), the server's response_format
and batch jobs, and for calls that `tool_choice` forces (ironlm.tools writes their grammar in Lark).
"""
import json
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from ironlm.errors import IronlmError, RequestError

# Bounds on grammar work so a hostile schema cannot stall a worker: lexer fuel, grammar size, per-step work.
GRAMMAR_LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
                      max_lexer_states=50_000, max_grammar_size=200_000, verbose_errors=False)
# Compact JSON: a flexible-whitespace grammar lets a small model emit newlines forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_BYTES = 64 * 1024


def read_schema(given: str, option: str = "--json-schema") -> dict:
    """A JSON schema given on a command line: the path of a .json file, or the schema's own JSON text."""
    text = given
    if not text.lstrip().startswith(("{", "[")):
        try:
            text = Path(given).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise IronlmError(f"cannot read the JSON schema file {given}: {exc}; give a file or the schema's "
                              f"JSON text") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IronlmError(f"{option} is not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise IronlmError(f'{option} must be a JSON schema object, such as {{"type": "object"}}')
    return schema


class JsonLogitsProcessor:
    """SamplingParams.logits_processor for one sequence: masks every token the grammar forbids next."""

    def __init__(self, matcher, eos_token_ids: frozenset[int], vocab_size: int):
        self.matcher = matcher
        self.eos_token_ids = eos_token_ids
        self.num_consumed = 0
        self.words = np.empty((vocab_size + 31) // 32, dtype=np.int32)  # (V/32,) the allowed tokens' bits
        self.neg_inf = torch.tensor(float("-inf"))

    def _catch_up(self, generated_token_ids: list[int]) -> None:
        if len(generated_token_ids) < self.num_consumed:  # cannot happen with recompute, but stay exact
            self.matcher.reset()
            self.num_consumed = 0
        for token_id in generated_token_ids[self.num_consumed:]:
            self.matcher.consume_token(token_id)
        self.num_consumed = len(generated_token_ids)

    def forced_tokens(self, generated_token_ids: list[int]) -> list[int]:
        """The tokens the grammar allows alone after generated_token_ids: a key and its quotes and colon, the rest
        of an enum value. The engine appends them unsampled, and one step computes them all."""
        self._catch_up(generated_token_ids)
        return [] if self.matcher.is_error() else self.matcher.compute_ff_tokens()

    def __call__(self, generated_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        # logits: (V,), the sampler's own copy, masked in place
        self._catch_up(generated_token_ids)
        vocab_size = logits.shape[0]
        if self.matcher.is_error():
            allowed = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
            allowed[list(self.eos_token_ids)] = True  # end the output rather than emit anything invalid
        else:
            # One bit per token, written by llguidance without the GIL; unpacking it and one torch.where cost
            # well under a byte-per-token mask and masked_fill (benchmarks/bench_sampler.py, JSON-schema case).
            self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
            bits = np.unpackbits(self.words.view(np.uint8), count=vocab_size, bitorder="little")  # (V,) 0/1
            allowed = torch.from_numpy(bits).view(torch.bool)
        return torch.where(allowed, logits, self.neg_inf, out=logits)


class GrammarCompiler:
    """Turns JSON schemas into per-sequence logits processors. Thread-safe; methods block (run them off an
    event loop)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer = None
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        try:
            import llguidance  # noqa: F401
        except ImportError:
            return False
        return True

    def prepare(self) -> None:
        """Builds the llguidance view of the vocabulary (about a second, once)."""
        import llguidance

        with self._lock:
            if self._ll_tokenizer is not None:
                return
            with tempfile.TemporaryDirectory() as directory:
                self.tokenizer.save(directory)
                tokenizer_json = (Path(directory) / "tokenizer.json").read_text(encoding="utf-8")
            self._ll_tokenizer = llguidance.LLTokenizer(
                tokenizer_json, n_vocab=self.vocab_size, eos_token=sorted(self.tokenizer.eos_token_ids))

    def compile(self, schema: dict, num_sequences: int, param: str = "json_schema") -> list[JsonLogitsProcessor]:
        """One processor per sequence; a schema llguidance rejects is a RequestError naming `param`."""
        llguidance = self._llguidance(param)
        try:
            text = json.dumps(schema)
        except (TypeError, ValueError) as exc:  # a Python caller's set, object or cycle
            raise RequestError(f"the JSON schema holds something JSON cannot express ({exc})", param=param) from None
        if len(text) > MAX_SCHEMA_BYTES:
            raise RequestError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes", param=param)
        self.prepare()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise RequestError(f"invalid JSON schema: {exc}", param=param) from None
        return self._processors(grammar, num_sequences, param, "JSON schema")

    def compile_lark(self, lark: str, num_sequences: int, param: str) -> list[JsonLogitsProcessor]:
        """One processor per sequence for a grammar in llguidance's Lark dialect (which embeds JSON schemas with
        %json); what llguidance rejects in it is a RequestError naming `param`."""
        llguidance = self._llguidance(param)
        if len(lark) > 2 * MAX_SCHEMA_BYTES:
            raise RequestError(f"the schemas of this request add up to more than {2 * MAX_SCHEMA_BYTES} bytes",
                               param=param)
        self.prepare()
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        except ValueError as exc:
            raise RequestError(f"invalid grammar: {exc}", param=param) from None
        return self._processors(grammar, num_sequences, param, "schema")

    def _llguidance(self, param: str):
        if not self.available():
            raise RequestError("output constrained to a JSON schema needs the llguidance package: "
                               "pip install llguidance", param=param)
        import llguidance

        return llguidance

    def _processors(self, grammar: str, num_sequences: int, param: str, what: str) -> list[JsonLogitsProcessor]:
        import llguidance

        limits = llguidance.LLParserLimits(**GRAMMAR_LIMITS)
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise RequestError(f"unsupported {what}: {matcher.get_error()[:500]}", param=param)
        eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        return [JsonLogitsProcessor(matcher if i == 0 else matcher.deep_copy(), eos_token_ids, self.vocab_size)
                for i in range(num_sequences)]
