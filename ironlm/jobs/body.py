"""One batch item's body -> engine requests, and the engine's results -> the endpoint's response body.

The request models, their checks and the request -> SamplingParams translation are the server's own
(ironlm.server), and response_format and tool-call grammars come from the same compiler (ironlm.grammar), so a
batch line behaves exactly as the same request sent to the server would.
"""
from dataclasses import dataclass, field

from pydantic import ValidationError

from ironlm.errors import IronlmError, RequestError
from ironlm.grammar import GrammarCompiler
from ironlm.jobs.batch_file import error_line
from ironlm.sampling import SampleResult, SamplingParams
from ironlm.server import protocol
from ironlm.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request
from ironlm.server.translate import (TokenTexts, compile_grammar, echo_texts, grammar_source,
                                     request_sampling_params, request_thinking, request_tools,
                                     tokenize_request)
from ironlm.tools import ToolSet


@dataclass
class PreparedBody:
    kind: str                      # "chat" | "completion"
    prompts: list[list[int]]       # token ids per prompt
    params: list[SamplingParams]   # one per choice; choice i answers prompts[i // n]
    n: int
    logprobs: bool = False         # the response carries each choice's logprobs
    tools: ToolSet | None = None   # the tools a chat body offers; calls are read out of the answers
    echo_texts: list[str] | None = None  # per prompt, when a completion repeats its prompt (echo)
    thinking: bool | None = None   # a reasoning model's chat: whether the answer starts inside its thinking

    @property
    def requests(self) -> list[tuple[list[int], SamplingParams]]:
        return [(self.prompts[i // self.n], p) for i, p in enumerate(self.params)]


@dataclass
class Completion:
    """What one engine request gave, built up from its outputs with `add`."""

    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[SampleResult] = field(default_factory=list)  # one per token, when its params asked
    prompt_logprobs: list[SampleResult | None] | None = None     # one per prompt token, when echo asked
    num_cached_tokens: int = 0                                    # prompt tokens found in the prefix cache

    def add(self, output) -> None:
        """Takes one RequestOutput of the request; the last one (finished) completes it."""
        self.logprobs += output.logprobs
        if output.prompt_logprobs is not None:  # they come with the first token
            self.prompt_logprobs = output.prompt_logprobs
        self.text, self.num_tokens, self.finish_reason = output.text, len(output.token_ids), output.finish_reason
        self.num_cached_tokens = output.num_cached_tokens


def prepare_body(url: str, body: dict, tokenizer, max_model_len: int, model_name: str,
                 grammar: GrammarCompiler) -> PreparedBody:
    """Validates the body as the server would, tokenizes it and, for a response_format with a JSON schema,
    compiles its grammar with `grammar`; raises APIError or RequestError."""
    kind = "chat" if url == "/v1/chat/completions" else "completion"
    model = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        req = model.model_validate({**body, "model": body.get("model") or model_name})
    except ValidationError as exc:
        raise protocol.validation_error_to_api(exc) from None
    req.check()
    if req.stream:
        raise bad_request("'stream' is not supported in a batch; leave it out", param="stream")
    tools = request_tools(tokenizer, req)
    prompts = tokenize_request(tokenizer, req, tools)
    params = [request_sampling_params(req, len(prompts[i // req.n]), i % req.n, max_model_len, tokenizer.vocab_size)
              for i in range(len(prompts) * req.n)]
    source = grammar_source(req, tools)
    if source is not None:
        for p, processor in zip(params, compile_grammar(grammar, source, len(params), tools)):
            p.logits_processor = processor
    want_logprobs = req.logprobs if kind == "chat" else req.logprobs is not None
    return PreparedBody(kind, prompts, params, req.n, want_logprobs, tools, echo_texts(tokenizer, req),
                        request_thinking(tokenizer, req, prompts))


def response_body(prepared: PreparedBody, model_name: str, results: list[Completion], response_id: str,
                  created: int, token_texts: TokenTexts) -> dict:
    """The chat.completion or text_completion object the server would have answered with."""
    choices = []
    for i, result in enumerate(results):
        entries = token_texts.entries(result.logprobs) if prepared.logprobs else None
        if prepared.kind == "chat":
            message, finish_reason = protocol.chat_message(result.text, result.finish_reason, prepared.tools,
                                                           prepared.thinking)
            choices.append({"index": i, "message": message,
                            "logprobs": None if entries is None else protocol.chat_logprobs(entries),
                            "finish_reason": finish_reason})
        else:
            text = result.text
            if prepared.echo_texts is not None:
                prompt = i // prepared.n
                text = prepared.echo_texts[prompt] + text
                if entries is not None:
                    entries = token_texts.prompt_entries(prepared.prompts[prompt], result.prompt_logprobs) + entries
            choices.append({"index": i, "text": text, "finish_reason": result.finish_reason,
                            "logprobs": None if entries is None else protocol.completion_logprobs(entries)})
    num_prompt = sum(len(p) for p in prepared.prompts)
    return {"id": response_id, "object": "chat.completion" if prepared.kind == "chat" else "text_completion",
            "created": created, "model": model_name, "system_fingerprint": None, "choices": choices,
            "usage": protocol.usage(num_prompt, sum(r.num_tokens for r in results),
                                    sum(r.num_cached_tokens for r in results[::prepared.n]))}


def failure_line(custom_id: str, exc: BaseException) -> dict:
    """An error-file line for an item that could not be served; the message is the user-facing one."""
    if isinstance(exc, APIError):
        return error_line(custom_id, exc.message, exc.code, exc.param, exc.status, exc.type)
    if isinstance(exc, RequestError):
        return error_line(custom_id, str(exc), exc.code, exc.param)
    if isinstance(exc, IronlmError):
        return error_line(custom_id, str(exc))
    raise exc
