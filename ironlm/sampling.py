"""Sampling parameters and the batched sampler."""
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ironlm.errors import RequestError

# (generated_token_ids, logits (V,)) -> logits (V,); used for grammars and custom biasing.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k None or 0 means no top-k. Penalties follow Hugging Face
    (repetition, over prompt and output) and OpenAI (presence/frequency, over the output only).
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
    skip_special_tokens: bool = True
    logits_processor: LogitsProcessor | None = field(default=None, repr=False, compare=False)

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(param: str, why: str) -> RequestError:
            return RequestError(f"{param}={getattr(self, param)!r} is invalid: {why}", param=param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
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
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be between 0 and {MAX_LOGPROBS}")
        if self.stop is not None:
            if isinstance(self.stop, str):
                self.stop = [self.stop]
            if not all(isinstance(s, str) and s for s in self.stop):
                raise bad("stop", "must be a list of non-empty strings")
        for token_id in self.stop_token_ids or []:
            if not isinstance(token_id, int) or token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                raise bad("stop_token_ids", f"token id {token_id!r} is outside the vocabulary")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class SampleState:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # per-request when seeded, for reproducibility across batches


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    """Turns a batch of logits into one token per sequence, each with its own parameters."""

    def __call__(self, logits: torch.Tensor, states: list[SampleState]) -> list[SampleResult]:
        # logits: (B, V) in any float dtype
        logits = logits.float()
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in states):
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # (B, V) the model's own distribution
        logits = logits.clone()
        for i, state in enumerate(states):
            self._apply_penalties(logits[i], state)
            if state.params.logits_processor is not None:
                logits[i] = state.params.logits_processor(state.output_token_ids, logits[i])
        results = []
        for i, state in enumerate(states):
            token_id = self._pick(logits[i], state)
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
    def _apply_penalties(row: torch.Tensor, state: SampleState) -> None:
        p = state.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(state.prompt_token_ids) | set(state.output_token_ids)), dtype=torch.long)
            if seen.numel():
                values = row[seen]
                row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and state.output_token_ids:
            counts = torch.bincount(torch.tensor(state.output_token_ids), minlength=row.numel())[: row.numel()]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)

    @staticmethod
    def _pick(row: torch.Tensor, state: SampleState) -> int:
        p = state.params
        if p.greedy:
            return int(row.argmax())
        row = row / p.temperature
        if p.top_k:
            kth = row.topk(min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        # Inverse-CDF draw: one uniform number and a binary search, ~15x cheaper than torch.multinomial on CPU.
        # Zero-probability tokens add nothing to the CDF, so the first index whose CDF exceeds u is never one.
        cdf = probs.double().cumsum(0)
        u = torch.rand(1, generator=state.generator, dtype=torch.float64) * cdf[-1]
        return int(torch.searchsorted(cdf, u, right=True).clamp_(max=probs.numel() - 1))
