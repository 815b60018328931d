"""OpenAI request models, their validation, and errors in OpenAI's shape."""
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ironlm import reasoning
from ironlm.tools import MAX_TOOLS, ToolSet

MAX_N = 16                 # choices per prompt
MAX_PROMPTS = 64           # prompts in one /v1/completions request
MAX_SEQUENCES = 64         # prompts x n
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


class APIError(Exception):
    """An error the client sees as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def validation_error_to_api(exc: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field, without echoing large inputs."""
    first = exc.errors(include_url=False, include_input=False)[0]
    if first["type"] == "json_invalid":
        return bad_request(f"Request body is not valid JSON: {first['msg']}", code="invalid_json")
    # locations also name the union member tried ("str", "list[int]"); keep the field path only
    param = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS))
    return bad_request(f"Invalid value for '{param or 'body'}': {first['msg']}", param=param or None)


class _Strict(BaseModel):
    # strict: "5" is not an integer; unknown fields (sent by LangChain and others) are ignored
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field("response", max_length=256)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema(self) -> dict | None:
        """The JSON schema the output must match; None for plain text."""
        if self.type == "text":
            return None
        return {"type": "object"} if self.type == "json_object" else self.json_schema.schema_


class _SamplingFields(_Strict):
    model: str = Field(max_length=512)
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1, le=1 << 31)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions shared with vLLM and llama.cpp's server
    top_k: int | None = Field(None, ge=0, le=1 << 20)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False

    def stop_list(self) -> list[str] | None:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not stop:
            return None
        if len(stop) > MAX_STOP or not all(stop):
            raise bad_request(f"'stop' must hold 1 to {MAX_STOP} non-empty strings", param="stop")
        return stop

    def logit_bias_ids(self) -> dict[int, float] | None:
        """logit_bias with its keys (token ids, written as strings in JSON) as integers."""
        if not self.logit_bias:
            return None
        try:
            return {int(key): bias for key, bias in self.logit_bias.items()}
        except ValueError:
            raise bad_request("'logit_bias' maps token ids (written as strings, such as \"50256\") to a bias from "
                              "-100 to 100", param="logit_bias") from None

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
            raise bad_request("response_format json_schema needs 'json_schema.schema'", param="response_format")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str = Field(max_length=64)
    arguments: str  # JSON text, as the model wrote it


class MessageToolCall(_Strict):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, max_length=MAX_TOOLS)  # assistant: the calls it made
    tool_call_id: str | None = Field(None, max_length=256)  # tool: the call this message answers

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content

    def plain(self) -> dict:
        """The message as the chat template and ironlm.tools take it."""
        text = self.text()
        message = {"role": self.role, "content": "" if text is None and not self.tool_calls else text}
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(_Strict):
    name: str  # its form, the parameters' and the choice's checks: ironlm.tools.read_tools, shared with LLM.chat
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 31)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more template variables ({"enable_thinking": false})
    # The deprecated forms of tools; read only to refuse them, rather than answer with plain text the client
    # would take for a decision not to call.
    functions: list[Any] | None = None
    function_call: Any = None

    def check(self) -> None:
        self.check_common()
        if self.functions is not None or self.function_call is not None:
            raise bad_request("the deprecated 'functions' and 'function_call' are not supported; send the same "
                              "definitions as 'tools' (each {\"type\": \"function\", \"function\": {...}}) and "
                              "'tool_choice'", param="functions" if self.functions is not None else "function_call")
        if self.tool_choice not in (None, "none") and not self.tools:  # the rest: ironlm.tools.read_tools
            raise bad_request("'tool_choice' needs 'tools'", param="tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
        for i, message in enumerate(self.messages):
            if message.role != "assistant" and message.content is None:
                raise bad_request(f"messages[{i}] has no content", param=f"messages.{i}.content")
            if message.role == "tool" and message.tool_call_id is None:
                raise bad_request(f"messages[{i}] is a tool result without 'tool_call_id'; give the id of the call "
                                  f"it answers", param=f"messages.{i}.tool_call_id")
            if message.tool_calls and message.role != "assistant":
                raise bad_request(f"messages[{i}] has tool_calls but is not an assistant message",
                                  param=f"messages.{i}.tool_calls")

    def tool_choice_raw(self) -> str | dict:
        """tool_choice as OpenAI's JSON has it."""
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=1 << 31)  # 0: no new token; with echo and logprobs, scoring
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise bad_request("'suffix' is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("'best_of' other than n is not supported", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as text or token ids; each becomes n choices."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise bad_request(f"'prompt' must hold 1 to {MAX_PROMPTS} prompts", param="prompt")
        if len(prompts) * self.n > MAX_SEQUENCES:
            raise bad_request(f"prompts x n must be at most {MAX_SEQUENCES}", param="n")
        for p in prompts:
            if len(p) == 0:
                raise bad_request("a prompt is empty", param="prompt")
        return prompts


class TokenizeRequest(_Strict):
    """/tokenize (as vLLM's): a prompt, or chat messages (with tools) rendered as a chat request would be."""

    model: str | None = Field(None, max_length=512)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = True  # for a prompt: BOS where the model adds one

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give either 'prompt' or 'messages'", param="prompt")


class DetokenizeRequest(_Strict):
    model: str | None = Field(None, max_length=512)
    tokens: list[int]

    def check(self) -> None:
        pass  # the vocabulary check needs the model: the server does it


def parse_request(model: type[BaseModel], body: bytes):
    """Validate a JSON body into `model`; any problem is a 400 in OpenAI's shape."""
    try:
        request = model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error_to_api(exc) from None
    request.check()
    return request


# ---- responses --------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens whose K/V came from the prefix cache, not computed."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}


def chat_chunk(response_id: str, created: int, model: str, choices: list[dict], include_usage: bool) -> dict:
    chunk = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None, "choices": choices}
    if include_usage:
        chunk["usage"] = None
    return chunk


def completion_chunk(response_id: str, created: int, model: str, choices: list[dict], include_usage: bool) -> dict:
    chunk = {"id": response_id, "object": "text_completion", "created": created, "model": model,
             "system_fingerprint": None, "choices": choices}
    if include_usage:
        chunk["usage"] = None
    return chunk


def chat_message(answer: str, finish_reason: str | None, tools: ToolSet | None,
                 thinking: bool | None = None) -> tuple[dict, str | None]:
    """The assistant message of a finished chat choice and its finish_reason, with the calls read out of the
    answer when the request offered tools. With `thinking` (request_thinking: a reasoning model), the thinking
    goes to reasoning_content."""
    message = {"role": "assistant", "content": answer, "refusal": None}
    if thinking is not None:
        message["reasoning_content"], answer = reasoning.split(answer, thinking)
        message["content"] = answer
    parsed = tools.parse(answer) if tools is not None else None
    if not parsed or not parsed.calls:
        return message, finish_reason
    message["content"] = answer[:parsed.content_end].strip() or None
    message["tool_calls"] = [call.openai() for call in parsed.calls]
    return message, tools.finish_reason(finish_reason, True)


def chat_delta(thought: str, text: str) -> dict:
    """A streamed chat choice's delta: a reasoning model's thinking as reasoning_content, its answer as content."""
    if not thought:
        return {"content": text}
    return {"reasoning_content": thought, "content": text} if text else {"reasoning_content": thought}


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict:
    """entries: (token text, logprob, [(top token text, logprob)]) per generated token."""
    def item(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [dict(item(t, lp), top_logprobs=[item(tt, tlp) for tt, tlp in top]) for t, lp, top in entries],
            "refusal": None}


def completion_logprobs(entries: list[tuple[str, float | None, list[tuple[str, float]] | None]],
                        text_offset: int = 0) -> dict:
    """entries as chat_logprobs takes them; an echoed prompt's first token has None for logprob and top."""
    offsets = []
    for text, _, _ in entries:
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if top is None else dict(top) for _, _, top in entries], "text_offset": offsets}


def now() -> int:
    return int(time.time())
