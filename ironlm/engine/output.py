"""Per-request output: incremental text, stop conditions, and what one step reports."""
from dataclasses import dataclass, field

from ironlm.engine.sequence import Sequence
from ironlm.sampling import SampleResult
from ironlm.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    logprobs: list[SampleResult] = field(default_factory=list)  # one per new token when requested
    # with the first token, when requested: one per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: list[SampleResult | None] | None = None
    metrics: dict = field(default_factory=dict)


class OutputState:
    """Detokenizes one request's tokens and finds stop strings without emitting text that a stop might retract."""

    def __init__(self, tokenizer: Tokenizer, seq: Sequence):
        params = seq.params
        self.detokenizer = tokenizer.detokenizer(seq.prompt_token_ids, skip_special_tokens=params.skip_special_tokens)
        self.stop = params.stop or []
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars a partial stop string could span
        self.text = ""        # all accepted text (stop string excluded)
        self.emitted = 0      # chars of self.text already reported
        self.stopped_by_string = False
        self.stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            self.stop_ids |= set(tokenizer.eos_token_ids)

    def add_token(self, seq: Sequence, token_id: int, max_model_len: int) -> str | None:
        """Takes a sampled token (already appended to seq); returns a finish reason or None."""
        if token_id in self.stop_ids:
            return "stop"
        start = max(0, len(self.text) - self.hold - 1)
        self.text += self.detokenizer.add([token_id])
        for stop in self.stop:
            position = self.text.find(stop, start)
            if position != -1:
                self.text = self.text[:position]
                self.stopped_by_string = True
                return "stop"
        if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= max_model_len:
            return "length"
        return None

    def finish(self) -> None:
        if not self.stopped_by_string:
            self.text += self.detokenizer.flush()
        self.hold = 0

    def take_new_text(self, finished: bool) -> str:
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        new = self.text[self.emitted:end]
        self.emitted = end
        return new
