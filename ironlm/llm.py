"""The offline Python API: LLM.generate and LLM.chat over the shared engine step loop."""
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

from ironlm import reasoning
from ironlm.config import EngineConfig
from ironlm.engine.llm_engine import LLMEngine
from ironlm.engine.output import RequestOutput
from ironlm.errors import RequestError
from ironlm.sampling import SampleResult, SamplingParams
from ironlm.tools import ToolCall, read_tools, render_chat, tool_set

Prompt = str | dict


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    metrics: dict = field(default_factory=dict)
    tool_calls: list[ToolCall] = field(default_factory=list)  # LLM.chat with tools: the calls in `text`
    reasoning: str | None = None  # LLM.chat of a reasoning model: its thinking, which `text` then leaves out
    # SamplingParams.prompt_logprobs: one per prompt token (None for the first), each with its top alternatives
    prompt_logprobs: list[SampleResult | None] | None = None


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
             use_tqdm: bool = False, tools: list[dict] | None = None, tool_choice: str | dict | None = None,
             parallel_tool_calls: bool = True, chat_template_kwargs: dict | None = None) -> list[GenerationResult]:
        """Generates a reply to each conversation (a list of {"role", "content"} messages).

        `tools`, `tool_choice` and `parallel_tool_calls` are OpenAI's (tool_choice "required" or a named function
        forces a call through a grammar); each result's tool_calls holds the calls read out of its text, and
        messages may hold earlier calls (assistant "tool_calls") and their results ("tool" messages).
        `chat_template_kwargs` are more template variables, such as {"enable_thinking": False} for Qwen3.
        A reasoning model's thinking (a chat template with </think>) goes to each result's `reasoning`, apart
        from its answer in `text`.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tools = None if tools is None else tool_set(*read_tools(tools, tool_choice), parallel_tool_calls,
                                                    self.tokenizer)
        token_lists = [self.chat_prompt(conversation, tools, chat_template_kwargs) for conversation in conversations]
        params = self._params_list(params, len(token_lists))
        for i, p in enumerate(params):
            lark = None if tools is None else tools.grammar(p.json_schema)
            if lark is not None:
                processor, = tools.guarded(self.engine.grammar.compile_lark(lark, 1, "tools"), self.tokenizer)
                params[i] = dataclasses.replace(p, json_schema=None, logits_processor=processor)
        results = self._run(token_lists, params, use_tqdm)
        thinks = reasoning.template_thinks(self.tokenizer.chat_template)
        for result in results:
            if thinks:
                thinking = reasoning.ids_think(self.tokenizer, result.prompt_token_ids)
                result.reasoning, result.text = reasoning.split(result.text, thinking)
            if tools is not None:
                result.tool_calls = tools.parse(result.text).calls
                result.finish_reason = tools.finish_reason(result.finish_reason, bool(result.tool_calls))
        return results

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

    def chat_prompt(self, messages: list[dict], tools=None, chat_template_kwargs: dict | None = None) -> list[int]:
        """The token ids of a conversation rendered with the model's chat template, ready for a reply; `tools`
        (an ironlm.tools.ToolSet) adds the tools it offers, chat_template_kwargs more template variables."""
        text = render_chat(self.tokenizer, messages, tools, chat_template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself

    def _prompt_tokens(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), list):
            return prompt["prompt_token_ids"]
        raise RequestError('a prompt must be a string or {"prompt_token_ids": [int, ...]}', param="prompts")

    @staticmethod
    def _params_list(params, num_prompts: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * num_prompts
        if len(params) != num_prompts:
            raise RequestError(f"got {len(params)} SamplingParams for {num_prompts} prompts", param="params")
        return list(params)

    def _run(self, token_lists: list[list[int]], params, use_tqdm: bool) -> list[GenerationResult]:
        params = self._params_list(params, len(token_lists))
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
        prompt_logprobs: dict[str, list] = {}  # they come with a request's first token
        progress = None
        if use_tqdm:
            from tqdm import tqdm
            progress = tqdm(total=len(pending), desc="generating", unit="req")
        try:
            while pending:
                for out in self.engine.step():
                    if out.prompt_logprobs is not None:
                        prompt_logprobs[out.request_id] = out.prompt_logprobs
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = GenerationResult(
                            out.request_id, prompts[out.request_id], out.text, out.token_ids, out.finish_reason,
                            out.metrics, prompt_logprobs=prompt_logprobs.pop(out.request_id, None))
                        if progress is not None:
                            progress.update(1)
        finally:
            if progress is not None:
                progress.close()
        return results
