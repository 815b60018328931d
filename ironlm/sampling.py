"""Sampling parameters and the batched sampler."""
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ironlm import kernels
from ironlm.errors import RequestError

# (generated_token_ids, logits (V,)) -> logits (V,); used for grammars and custom biasing. A processor may also
# have forced_tokens(generated_token_ids) -> [token ids] that it allows alone next: the engine appends those
# without sampling (JSON grammars' keys and punctuation), unless logprobs are asked for.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # tokens one request may bias


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k None or 0 means no top-k. Penalties follow Hugging Face
    (repetition, over prompt and output) and OpenAI (presence/frequency, over the output only). logit_bias follows
    OpenAI: a value in [-100, 100] added to a token's logit at every step (-100 bans it, 100 all but forces it).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the prompt's own tokens' logprobs (and this many alternatives): scoring
    logit_bias: dict[int, float] | None = None
    json_schema: dict | None = None  # output constrained to JSON matching it ({"type": "object"}: any object)
    skip_special_tokens: bool = True
    logits_processor: LogitsProcessor | None = field(default=None, repr=False, compare=False)

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(param: str, why: str) -> RequestError:
            return RequestError(f"{param}={getattr(self, param)!r} is invalid: {why}", param=param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise bad("max_tokens", "must be an integer >= 0 (0: the prompt only, for its prompt_logprobs)")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "must be between 0 and 100")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise bad("top_k", "must be None or an integer >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "must be in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be between -2 and 2")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be None or an integer between 0 and {MAX_LOGPROBS}")
        if self.stop is not None:
            if isinstance(self.stop, str):
                self.stop = [self.stop]
            if not all(isinstance(s, str) and s for s in self.stop):
                raise bad("stop", "must be a list of non-empty strings")
        def outside(token_id) -> bool:
            return not isinstance(token_id, int) or token_id < 0 or (vocab_size is not None and token_id >= vocab_size)

        for token_id in self.stop_token_ids or []:
            if outside(token_id):
                raise bad("stop_token_ids", f"token id {token_id!r} is outside the vocabulary")
        if self.json_schema is not None:
            if not isinstance(self.json_schema, dict):
                raise bad("json_schema", "must be a JSON schema as a dict, such as {\"type\": \"object\"}")
            if self.logits_processor is not None:
                raise RequestError("give json_schema or logits_processor, not both (the schema makes its own)",
                                   param="json_schema")
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise RequestError(f"logit_bias holds {len(self.logit_bias)} tokens; at most {MAX_LOGIT_BIAS}",
                                   param="logit_bias")
            for token_id, bias in self.logit_bias.items():
                if outside(token_id):
                    raise RequestError(f"logit_bias: token id {token_id!r} is outside the vocabulary"
                                       + (f" (0..{vocab_size - 1})" if vocab_size is not None else ""),
                                       param="logit_bias")
                if not isinstance(bias, (int, float)) or not -100.0 <= bias <= 100.0:
                    raise RequestError(f"logit_bias: the bias of token {token_id} is {bias!r}; it must be a number "
                                       f"from -100 to 100", param="logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class SeenTokens:
    """The distinct token ids of a sequence's prompt and output, kept up to date as tokens arrive. The repetition
    penalty reads them every step, and building them anew from a 1,500-token prompt for each of 64 sequences took
    longer than the rest of the step's sampling (benchmarks/bench_sampler.py)."""

    def __init__(self, prompt_token_ids: list[int]):
        self._ids = set(prompt_token_ids)
        self._tensor = torch.tensor(sorted(self._ids), dtype=torch.long)  # (n,)
        self._outputs = 0  # output tokens counted so far

    def ids(self, output_token_ids: list[int], drafts: int = 0) -> torch.Tensor:
        """(n,) int64 ids of the prompt and of output_token_ids, a list whose tokens before its last `drafts` only
        grow between calls; the drafts (prompt lookup's, which a later call may not see) count for this call alone."""
        kept = len(output_token_ids) - drafts
        new = []
        for token_id in output_token_ids[self._outputs:kept]:
            if token_id not in self._ids:
                self._ids.add(token_id)
                new.append(token_id)
        self._outputs = kept
        if new:
            self._tensor = torch.cat([self._tensor, torch.tensor(new, dtype=torch.long)])
        drafted = [t for t in dict.fromkeys(output_token_ids[kept:]) if t not in self._ids]
        return torch.cat([self._tensor, torch.tensor(drafted, dtype=torch.long)]) if drafted else self._tensor


@dataclass
class SampleState:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # per-request when seeded, for reproducibility across batches
    seen: SeenTokens | None = None     # kept across steps by the caller when a repetition penalty applies
    drafts: int = 0                    # the last tokens of output_token_ids are prompt-lookup drafts


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def _writes_logits(p: SamplingParams) -> bool:
    return (not p.greedy or p.logits_processor is not None or p.repetition_penalty != 1.0
            or bool(p.presence_penalty) or bool(p.frequency_penalty) or bool(p.logit_bias))


class Sampler:
    """Turns a batch of logits into one token per sequence, each with its own parameters. Rows go
    through each step together (one softmax, one cumsum over the batch), as per-row calls over a
    49k vocabulary cost a large share of a batched decode step."""

    def __call__(self, logits: torch.Tensor, states: list[SampleState], writable: bool = False) -> list[SampleResult]:
        """logits: (B, V) in any float dtype. writable: the caller hands over float32 logits it will not read again,
        so penalties and sampling work in them rather than in a copy (12 MB for 64 rows of a 49k vocabulary)."""
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in states):
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V) the model's own distribution
        # A private contiguous float32 copy when anything writes into the logits (penalties, processors, sampling in
        # place) and the caller did not hand them over; plain greedy rows only read them.
        if logits.dtype != torch.float32 \
                or (any(_writes_logits(s.params) for s in states) and not (writable and logits.is_contiguous())):
            logits = logits.float() if logits.dtype != torch.float32 else logits.clone(memory_format=torch.contiguous_format)
        self._apply_repetition_penalties(logits, states)
        for i, state in enumerate(states):
            self._apply_penalties(logits[i], state)
            if state.params.logits_processor is not None:
                logits[i] = state.params.logits_processor(state.output_token_ids, logits[i])
        results = []
        for i, (state, token_id) in enumerate(zip(states, self._pick(logits, states))):
            result = SampleResult(token_id)
            if raw_logprobs is not None and state.params.logprobs is not None:
                row = raw_logprobs[i]
                result.logprob = float(row[token_id])
                if state.params.logprobs > 0:
                    values, ids = row.topk(state.params.logprobs)
                    result.top_logprobs = list(zip(ids.tolist(), values.tolist()))
            results.append(result)
        return results

    @staticmethod
    def _apply_repetition_penalties(logits: torch.Tensor, states: list[SampleState]) -> None:
        """Every row's seen tokens at once (Hugging Face's rule: positive logits divided, negative multiplied)."""
        rows = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
        if not rows:
            return
        ids = [(states[i].seen or SeenTokens(states[i].prompt_token_ids)).ids(states[i].output_token_ids,
                                                                             states[i].drafts) for i in rows]
        kernels.apply_repetition_penalty(logits, rows, ids, [states[i].params.repetition_penalty for i in rows])

    @staticmethod
    def _apply_penalties(row: torch.Tensor, state: SampleState) -> None:
        p = state.params
        if (p.presence_penalty or p.frequency_penalty) and state.output_token_ids:
            counts = torch.bincount(torch.tensor(state.output_token_ids), minlength=row.numel())[: row.numel()]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        if p.logit_bias:
            row[list(p.logit_bias)] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype)

    @staticmethod
    def _pick(logits: torch.Tensor, states: list[SampleState]) -> list[int]:
        # logits: (B, V) after penalties -> one token id per row
        picks = [0] * len(states)
        greedy = [i for i, s in enumerate(states) if s.params.greedy]
        if greedy:
            rows = logits if len(greedy) == len(states) else logits[greedy]
            ids = rows.numpy().argmax(-1).tolist()  # numpy's argmax: several times faster than torch's on CPU
            for i, token_id in zip(greedy, ids):
                picks[i] = token_id
        sampled = [i for i, s in enumerate(states) if not s.params.greedy]
        if not sampled:
            return picks
        params = [states[i].params for i in sampled]
        # Temperature, top-k, min-p, top-p and the draw in one kernel call (csrc/sample_impl.h): row by row on the
        # thread pool, each finding its cuts from a histogram of its weights rather than sorting its vocabulary.
        # u: one uniform number per row, from the request's own generator when seeded.
        weights = logits if len(sampled) == len(states) else logits[sampled]  # (S, V)
        u = torch.cat([torch.rand(1, generator=states[i].generator, dtype=torch.float64) for i in sampled])
        ids = kernels.sample(weights, torch.tensor([p.temperature for p in params]),
                             torch.tensor([p.top_k or 0 for p in params]), torch.tensor([p.top_p for p in params]),
                             torch.tensor([p.min_p for p in params]), u)
        for i, token_id in zip(sampled, ids):
            picks[i] = token_id
        return picks
