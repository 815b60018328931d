"""Function calling (OpenAI `tools`): the tools written into the prompt, calls read back out of the answer, and
the grammar that makes a call certain when `tool_choice` asks for one.

Models write calls in one of three shapes, named after the templates that teach them:
- "hermes":  <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>, one block per call (Qwen2/2.5/3,
  Hermes, SmolLM3). It is also the shape ironlm's own tool prompt asks for when a template knows no tools;
- "llama":   a bare {"name": "f", "parameters": {...}} object, at times after <|python_tag|> (Llama 3.1-3.3);
- "mistral": [TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...].
The reader accepts all three whatever the template, since small models drift between them; text that is not
a valid call of an offered tool stays the message's content.
"""
import json
import re
import uuid
from dataclasses import dataclass

from ironlm.errors import RequestError
from ironlm.grammar import JSON_OPTIONS

MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8  # calls in one answer
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
# Markers a template may put before a bare JSON call; the detokenizer drops them when they are special tokens.
BARE_MARKERS = ("<|python_tag|>", "[TOOL_CALLS]")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.S)
# Template inputs that chat_template_kwargs may not replace
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt", "chat_template", "bos_token",
                       "eos_token", "unk_token", "pad_token"})


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict  # JSON schema of the arguments object

    def openai(self) -> dict:
        function = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the arguments object as JSON text, as OpenAI sends it

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ParsedAnswer:
    content_end: int          # answer[:content_end] is the message's content; the calls follow it
    calls: list[ToolCall]     # empty: the whole answer is content


@dataclass(frozen=True)
class ToolSet:
    """The tools one request offers and how the answer may use them."""

    functions: tuple[Function, ...]
    choice: str      # "auto", "required", or the name of the one function the answer must call
    parallel: bool   # an answer may hold more than one call
    style: str       # "hermes" | "llama" | "mistral": the shape a forced call takes

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.functions)

    @property
    def max_calls(self) -> int:
        """Calls one answer may hold: one unless parallel calls are allowed; a named function is called once."""
        return MAX_PARALLEL_CALLS if self.parallel and self.choice in ("auto", "required") else 1

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        # OpenAI says "tool_calls" when the model chose to call, and "stop" when tool_choice named the function.
        if called and engine_reason == "stop" and self.choice in ("auto", "required"):
            return "tool_calls"
        return engine_reason

    # --- the grammar of a forced call ----------------------------------------------------------------------

    def grammar(self, answer_schema: dict | None) -> str | None:
        """A Lark grammar (llguidance's dialect) for the answer, or None when it is free text.

        "required" and a named function allow calls only; "auto" with a response_format allows calls or the
        JSON answer. Each function's parameters are a JSON schema of their own (%json), so their "$ref"s resolve
        within it, and the call's frame around them is literal text.
        """
        if self.choice == "auto" and answer_schema is None:
            return None
        functions = [f for f in self.functions if self.choice in ("auto", "required") or f.name == self.choice]
        key = "parameters" if self.style == "llama" else "arguments"
        rules = ["call_json: " + " | ".join(f"call_{i}" for i in range(len(functions)))]
        for i, function in enumerate(functions):
            # names are [A-Za-z0-9_-], so they need no escaping in JSON or Lark strings
            rules.append(f'call_{i}: "{{\\"name\\": \\"{function.name}\\", \\"{key}\\": " args_{i} "}}"')
            rules.append(f"args_{i}: %json {_with_options(_closed(function.parameters))}")
        # more calls after the first: bounded, so that a model looping on calls still stops
        more = "" if self.max_calls == 1 else f"{{0,{self.max_calls - 1}}}"
        if self.style == "hermes":
            rules.append(f'call: "{HERMES_OPEN}\\n" call_json "\\n{HERMES_CLOSE}"')
            calls = f'call ("\\n" call){more}' if more else "call"
        elif self.style == "mistral":
            calls = f'"[" call_json (", " call_json){more} "]"' if more else '"[" call_json "]"'
        else:  # Llama's bare object holds one call
            calls = "call_json"
        if self.choice == "auto":
            rules += [f"calls: {calls}", f"answer: %json {_with_options(answer_schema)}"]
            start = "calls | answer"
        else:
            start = calls
        return "\n".join([f"start: {start}", *rules]) + "\n"

    def guarded(self, processors: list, tokenizer) -> list:
        """The grammar's processors, ending answers that repeat a call where the grammar allows many calls."""
        if self.style == "hermes" and self.max_calls > 1:
            return [RepeatGuard(p, tokenizer) for p in processors]
        return processors

    # --- reading calls out of an answer --------------------------------------------------------------------

    def parse(self, answer: str) -> ParsedAnswer:
        """The calls in `answer`, in any of the three shapes; none if any part of them is not a valid call of an
        offered function (the answer is then content, as the client would want to see it)."""
        start = answer.find(HERMES_OPEN)
        if start >= 0:
            calls = []
            blocks = list(re.finditer(rf"{HERMES_OPEN}(.*?)({HERMES_CLOSE}|\Z)", answer[start:], re.S))
            for k, block in enumerate(blocks):
                call = self._call(loads_or_none(block.group(1)))
                if call is None and calls and k == len(blocks) - 1 and not block.group(2):
                    break  # a last call cut off by max_tokens: the complete ones before it stand
                if call is None:
                    return ParsedAnswer(len(answer), [])
                calls.append(call)
            return ParsedAnswer(start, self._distinct(calls))
        body = answer.strip()
        for marker in BARE_MARKERS:
            body = body.removeprefix(marker).strip()
        fence = _FENCE.fullmatch(body)
        if fence:
            body = fence.group(1)
        if not body.startswith(("{", "[")):
            return ParsedAnswer(len(answer), [])
        value = loads_or_none(body)
        items = value if isinstance(value, list) else [value]
        calls = [self._call(item) for item in items]
        if not calls or None in calls:
            return ParsedAnswer(len(answer), [])
        return ParsedAnswer(0, self._distinct(calls))

    def _distinct(self, calls: list[ToolCall]) -> list[ToolCall]:
        # a call repeated word for word is a model looping, not a second request
        seen, result = set(), []
        for call in calls:
            if (call.name, call.arguments) not in seen:
                seen.add((call.name, call.arguments))
                result.append(call)
        return result[:self.max_calls]

    def _call(self, value) -> ToolCall | None:
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
            arguments = loads_or_none(arguments)
        if not isinstance(arguments, dict):
            return None
        return ToolCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


class RepeatGuard:
    """A forced call's logits processor (JsonLogitsProcessor) that ends the answer once a <tool_call> block repeats
    an earlier one word for word: a model looping on one call (small ones do) would otherwise write it again
    until max_tokens, since the grammar allows another call after each."""

    def __init__(self, inner, tokenizer):
        self.inner = inner
        self.tokenizer = tokenizer

    def _looping(self, generated_token_ids: list[int]) -> bool:
        # a block just closed only if the last token holds its final ">"; decoding it alone keeps steps cheap
        if not generated_token_ids or ">" not in self.tokenizer.decode(generated_token_ids[-1:]):
            return False
        text = self.tokenizer.decode(generated_token_ids)
        if not text.endswith(HERMES_CLOSE):
            return False
        blocks = re.findall(rf"{HERMES_OPEN}(.*?){HERMES_CLOSE}", text, re.S)
        return blocks[-1] in blocks[:-1]

    def forced_tokens(self, generated_token_ids: list[int]) -> list[int]:
        return [] if self._looping(generated_token_ids) else self.inner.forced_tokens(generated_token_ids)

    def __call__(self, generated_token_ids: list[int], logits):
        logits = self.inner(generated_token_ids, logits)  # (V,)
        if self._looping(generated_token_ids):
            eos = list(self.inner.eos_token_ids)
            kept = logits[eos].clone()
            logits.fill_(float("-inf"))
            logits[eos] = kept  # the grammar allows the end after a complete call
        return logits


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def call_style(template: str | None) -> str:
    """The call shape a chat template teaches ("hermes" when it teaches none)."""
    template = template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if HERMES_OPEN in template:
        return "hermes"
    if "<|python_tag|>" in template or '"parameters"' in template:
        return "llama"
    return "hermes"


def read_tools(tools: list, tool_choice=None) -> tuple[list[Function], str | None]:
    """OpenAI's `tools` and `tool_choice` as Functions and "none"/"auto"/"required"/a function name; RequestError
    naming the field (such as "tools.2.function.name") for anything malformed."""
    if not isinstance(tools, (list, tuple)) or len(tools) > MAX_TOOLS:
        raise RequestError(f"tools must be a list of at most {MAX_TOOLS} tools", param="tools")
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise RequestError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": '
                               f'...}}}}', param=f"tools.{i}")
        name, description = function.get("name"), function.get("description")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RequestError(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-'",
                               param=f"tools.{i}.function.name")
        if description is not None and not isinstance(description, str):
            raise RequestError(f"tools[{i}].function.description must be a string",
                               param=f"tools.{i}.function.description")
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema of an object, such as "
                               f'{{"type": "object", "properties": {{...}}}}', param=f"tools.{i}.function.parameters")
        if any(f.name == name for f in functions):
            raise RequestError(f"two tools are named {name}; function names must be unique", param="tools")
        functions.append(Function(name, description, parameters))
    if isinstance(tool_choice, dict):
        named = tool_choice.get("function") if tool_choice.get("type") == "function" else None
        tool_choice = named.get("name") if isinstance(named, dict) else None
        if tool_choice not in {f.name for f in functions}:
            raise RequestError("tool_choice must name one of the tools: "
                               '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    elif tool_choice not in (None, "none", "auto", "required"):
        raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                           '{"name": ...}}', param="tool_choice")
    if tool_choice not in (None, "none") and not functions:
        raise RequestError("tool_choice needs tools", param="tool_choice")
    return functions, tool_choice


def tool_set(functions: list[Function], choice: str | None, parallel: bool, tokenizer) -> ToolSet | None:
    """The ToolSet of a request; None when it offers no tools or tool_choice is "none"."""
    if not functions or choice == "none":
        return None
    return ToolSet(tuple(functions), choice or "auto", parallel, template_tools(tokenizer)[1])


def template_tools(tokenizer) -> tuple[bool, str]:
    """(whether the chat template renders tools itself, the call shape answers take): without tools in the
    template, ironlm's tool prompt asks for the hermes shape."""
    native = "tools" in tokenizer.template_variables
    return native, call_style(tokenizer.chat_template) if native else "hermes"


# --- the prompt --------------------------------------------------------------------------------------------

def render_chat(tokenizer, messages: list[dict], tools: ToolSet | None, variables: dict | None = None) -> str:
    """The prompt text of a conversation that may offer tools and hold earlier calls and their results.

    messages are OpenAI's: an assistant message may carry "tool_calls" (arguments as JSON text), a "tool"
    message answers one of them. A template that renders tools itself gets them as transformers passes them
    (a `tools` list, each call's arguments as an object). Any other template gets ironlm's tool prompt in the
    system message, calls written back as <tool_call> blocks and results as user turns, since many templates
    refuse roles they do not know. `variables` are further template variables (chat_template_kwargs, such as
    Qwen3's enable_thinking); RequestError for a name the template's own inputs use.
    """
    variables = dict(variables or {})
    for name in variables:
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or name in _RESERVED:
            raise RequestError(f"chat_template_kwargs cannot set {name!r}: it must be a name the template reads, "
                               f"other than {', '.join(sorted(_RESERVED))}", param="chat_template_kwargs")
    if "tools" in tokenizer.template_variables:
        messages = [_native_message(m) for m in messages]
        if tools:
            variables["tools"] = [f.openai() for f in tools.functions]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **variables)
    messages = _calls_as_text(messages)
    if tools:
        messages = _with_tool_prompt(messages, tools)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **variables)


def _native_message(message: dict) -> dict:
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function") or {}
        arguments = loads_or_none(function.get("arguments")) if isinstance(function.get("arguments"), str) else None
        calls.append({**call, "function": {**function, "arguments": arguments if isinstance(arguments, dict)
                                           else function.get("arguments")}})
    return {**message, "tool_calls": calls}


def _calls_as_text(messages: list[dict]) -> list[dict]:
    result = []
    for message in messages:
        if message.get("role") == "tool":
            text = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if result and result[-1].get("role") == "user" and result[-1]["content"].endswith("</tool_response>"):
                result[-1] = {**result[-1], "content": result[-1]["content"] + "\n" + text}
            else:
                result.append({"role": "user", "content": text})
        elif message.get("tool_calls"):
            blocks = [f"{HERMES_OPEN}\n{_call_text(call)}\n{HERMES_CLOSE}" for call in message["tool_calls"]]
            content = "\n".join(([message["content"]] if message.get("content") else []) + blocks)
            result.append({k: v for k, v in message.items() if k != "tool_calls"} | {"content": content})
        else:
            result.append(message)
    return result


def _call_text(call: dict) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    parsed = loads_or_none(arguments) if isinstance(arguments, str) else arguments
    return json.dumps({"name": function.get("name"), "arguments": parsed if parsed is not None else arguments},
                      ensure_ascii=False)


def _with_tool_prompt(messages: list[dict], tools: ToolSet) -> list[dict]:
    listing = "\n".join(json.dumps(f.openai(), ensure_ascii=False) for f in tools.functions)
    lines = ["You can call functions to help with the answer. They are described by these JSON schemas:",
             f"<tools>\n{listing}\n</tools>",
             "To call a function, answer with nothing but a block like this one for each call:",
             f'{HERMES_OPEN}\n{{"name": "function name", "arguments": {{"argument": "value"}}}}\n{HERMES_CLOSE}',
             "Each function's result comes back to you in a <tool_response> block."]
    if tools.choice == "required":
        lines.append("Call at least one function now.")
    elif tools.choice != "auto":
        lines.append(f"Call the function {tools.choice} now.")
    if not tools.parallel:
        lines.append("Call one function at a time.")
    prompt = "\n".join(lines)
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{prompt}".lstrip()}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


# --- helpers -----------------------------------------------------------------------------------------------

def loads_or_none(text):
    """The JSON value of text, or None where it is no JSON."""
    try:
        return json.loads(text.strip())
    except (ValueError, AttributeError):
        return None


def _with_options(schema: dict) -> str:
    # compact JSON, as for response_format: a flexible-whitespace grammar lets a small model emit newlines forever
    return json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def _closed(parameters: dict) -> dict:
    # A function takes the arguments it names: unless the schema says otherwise, a forced call may not invent more.
    if "properties" in parameters and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
