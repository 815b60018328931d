"""The offline Python API: LLM.generate and LLM.chat over the shared engine step loop."""
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

from ironlm.config import EngineConfig
from ironlm.engine.llm_engine import LLMEngine
from ironlm.engine.output import RequestOutput
from ironlm.errors import RequestError
from ironlm.sampling import SamplingParams

Prompt = str | dict


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    metrics: dict = field(default_factory=dict)


class LLM:
    """A model loaded for generation.

    `model` is a Hugging Face directory or a GGUF file; None loads the embedded SmolLM2-135M-Instruct.
    `dtype` is "float32" or "bfloat16" (None: the best for this CPU); `threads` defaults to the physical cores.
    Extra keyword arguments are EngineConfig fields (max_model_len, max_num_seqs, ...).
    """

    def __init__(self, model: str | None = None, dtype: str | None = None, threads: int | None = None, **kwargs):
        self.config = EngineConfig(model=None if model is None else str(model), dtype=dtype, threads=threads, **kwargs)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer
        self.checkpoint = self.engine.checkpoint
        self.model_name = self.engine.model_name
        self._ids = count()

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[GenerationResult]:
        """Generates for each prompt: a string, or {"prompt_token_ids": [...]}. Results keep the prompts' order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        token_lists = [self._prompt_tokens(p) for p in prompts]
        return self._run(token_lists, params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[GenerationResult]:
        """Generates a reply to each conversation (a list of {"role", "content"} messages)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_lists = [self.chat_prompt(conversation) for conversation in conversations]
        return self._run(token_lists, params, use_tqdm)

    def stream(self, prompt_token_ids: list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields one RequestOutput per step for a single prompt; new_text never splits a character."""
        request_id = f"stream-{next(self._ids)}"
        self.engine.add_request(request_id, prompt_token_ids, params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(request_id)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The token ids of a conversation rendered with the model's chat template, ready for a reply."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself

    def _prompt_tokens(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), list):
            return prompt["prompt_token_ids"]
        raise RequestError('a prompt must be a string or {"prompt_token_ids": [int, ...]}', param="prompts")

    def _run(self, token_lists: list[list[int]], params, use_tqdm: bool) -> list[GenerationResult]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(token_lists)
        if len(params) != len(token_lists):
            raise RequestError(f"got {len(params)} SamplingParams for {len(token_lists)} prompts", param="params")
        prompts: dict[str, list[int]] = {}
        try:
            for tokens, p in zip(token_lists, params):
                request_id = f"gen-{next(self._ids)}"
                self.engine.add_request(request_id, tokens, p)
                prompts[request_id] = tokens
            results = self._drain(prompts, use_tqdm)
        finally:
            for request_id in prompts:  # nothing stays queued if we stop early (error or Ctrl-C)
                self.engine.abort_request(request_id)
        return [results[r] for r in prompts]

    def _drain(self, prompts: dict[str, list[int]], use_tqdm: bool) -> dict[str, GenerationResult]:
        pending = set(prompts)
        results: dict[str, GenerationResult] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm
            progress = tqdm(total=len(pending), desc="generating", unit="req")
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = GenerationResult(
                            out.request_id, prompts[out.request_id], out.text, out.token_ids, out.finish_reason,
                            out.metrics)
                        if progress is not None:
                            progress.update(1)
        finally:
            if progress is not None:
                progress.close()
        return results
