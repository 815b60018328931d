"""Function calling without a model: reading calls out of answers, the forced-call grammar
(checked with llguidance on SmolLM2's vocabulary) and the prompt a template with and without tool support gets."""
import json

import pytest

from ironlm.errors import RequestError
from ironlm.tokenizer import Tokenizer
from ironlm.tools import Function, ToolSet, call_style, read_tools, render_chat, tool_set

WEATHER = Function("get_weather", "Weather in a city", {
    "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}, "unit": {"enum": ["C", "F"]}},
    "required": ["city"], "$defs": {"City": {"type": "string", "maxLength": 20}}})
TIME = Function("get_time", None, {"type": "object", "properties": {}})


def tools(choice="auto", parallel=True, style="hermes") -> ToolSet:
    return ToolSet((WEATHER, TIME), choice, parallel, style)


def openai_tool(name="f", **function) -> dict:
    return {"type": "function", "function": {"name": name, **function}}


def test_read_tools():
    functions, choice = read_tools([openai_tool("get_time"), openai_tool("add", description="Adds", parameters={
        "type": "object", "properties": {"a": {"type": "number"}}})], {"type": "function", "function": {"name": "add"}})
    assert choice == "add" and [f.name for f in functions] == ["get_time", "add"]
    assert functions[0].parameters == {"type": "object", "properties": {}} and functions[1].description == "Adds"


@pytest.mark.parametrize("tools, choice, param", [
    ({"type": "function"}, None, "tools"),
    ([openai_tool()] * 129, None, "tools"),
    ([{"type": "retrieval", "function": {"name": "f"}}], None, "tools.0"),
    ([openai_tool(), "f"], None, "tools.1"),
    ([openai_tool("my tool")], None, "tools.0.function.name"),
    ([openai_tool("x" * 65)], None, "tools.0.function.name"),
    ([openai_tool(description=5)], None, "tools.0.function.description"),
    ([openai_tool(parameters={"type": "array"})], None, "tools.0.function.parameters"),
    ([openai_tool(parameters=[1])], None, "tools.0.function.parameters"),
    ([openai_tool(), openai_tool()], None, "tools"),
    ([openai_tool()], "always", "tool_choice"),
    ([openai_tool()], {"type": "function", "function": {"name": "g"}}, "tool_choice"),
    ([openai_tool()], {"type": "function"}, "tool_choice"),
    ([], "required", "tool_choice"),
])
def test_read_tools_names_what_is_wrong(tools, choice, param):
    with pytest.raises(RequestError) as info:
        read_tools(tools, choice)
    assert info.value.param == param


def calls_of(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("answer, content, calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})]),
    ('Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "Let me look.\n",
     [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    # a call repeated word for word is dropped; a last call cut off by max_tokens is dropped
    ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_time", "arguments": {}}'
     '</tool_call><tool_call>{"name": "get_weather", "argu', "", [("get_time", {})]),
    ('{"name": "get_weather", "parameters": {"city": "Rome", "unit": "C"}}', "",
     [("get_weather", {"city": "Rome", "unit": "C"})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {}}', "", [("get_time", {})]),
    ('[TOOL_CALLS] [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Nice"}}]',
     "", [("get_time", {}), ("get_weather", {"city": "Nice"})]),
    ('```json\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Bern\\"}"}\n```', "",
     [("get_weather", {"city": "Bern"})]),
])
def test_calls_are_read_in_every_shape(answer, content, calls):
    parsed = tools().parse(answer)
    assert calls_of(parsed) == calls
    assert answer[:parsed.content_end] == content
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in parsed.calls)
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)


@pytest.mark.parametrize("answer", [
    "The weather in Paris is mild.",
    '{"name": "launch_rockets", "arguments": {}}',                                   # not an offered tool
    '<tool_call>{"name": "get_weather", "arguments": {"city": }</tool_call>',        # not JSON
    '<tool_call>{"name": "get_weather", "arguments": ["Paris"]}</tool_call>',       # arguments not an object
    '{"city": "Paris"}',                                                              # a JSON answer, no call
    "",
])
def test_what_is_no_valid_call_stays_content(answer):
    parsed = tools().parse(answer)
    assert parsed.calls == [] and parsed.content_end == len(answer)


def test_one_call_unless_parallel_and_a_named_function_is_called_once():
    answer = ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
              '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>')
    assert len(tools().parse(answer).calls) == 2
    assert calls_of(tools(parallel=False).parse(answer)) == [("get_time", {})]
    assert len(tools(choice="get_time").parse(answer).calls) == 1
    assert tools().finish_reason("stop", True) == "tool_calls"
    assert tools(choice="get_time").finish_reason("stop", True) == "stop"  # as OpenAI answers a named function
    assert tools().finish_reason("length", True) == "length"
    assert tools().finish_reason("stop", False) == "stop"


def test_call_style_follows_the_template():
    assert call_style("{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}") == "hermes"
    assert call_style('{{ "<|python_tag|>" }} Respond with {"name": ..., "parameters": ...}') == "llama"
    assert call_style("[AVAILABLE_TOOLS] {{ tools }} [TOOL_CALLS]") == "mistral"
    assert call_style(None) == "hermes"


@pytest.fixture(scope="module")
def compiler(hf_tokenizer_dir):
    pytest.importorskip("llguidance")
    from ironlm.grammar import GrammarCompiler

    tok = Tokenizer.from_dir(hf_tokenizer_dir)
    return tok, GrammarCompiler(tok, tok.vocab_size)


def accepts(compiler, grammar: str, text: str) -> bool:
    """Whether the grammar takes `text` whole (each token allowed in turn, then the end)."""
    tok, grammar_compiler = compiler
    processor, = grammar_compiler.compile_lark(grammar, 1, "tools")
    matcher = processor.matcher
    for token_id in tok.encode(text, add_special_tokens=False):
        if not matcher.consume_token(token_id):
            return False
    return matcher.is_accepting()


def test_forced_call_grammar_takes_valid_calls_only(compiler):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
    time_call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    required = tools("required").grammar(None)
    assert accepts(compiler, required, call)
    assert accepts(compiler, required, call + "\n" + time_call)
    assert not accepts(compiler, tools("required", parallel=False).grammar(None), call + "\n" + time_call)
    assert accepts(compiler, required, "\n".join([time_call] * 8))  # MAX_PARALLEL_CALLS, and no more
    assert not accepts(compiler, required, "\n".join([time_call] * 9))
    assert not accepts(compiler, required, "Sure!")
    assert not accepts(compiler, required, call.replace('"unit": "C"', '"unit": "K"'))       # enum
    assert not accepts(compiler, required, call.replace('"unit"', '"colour"'))                # no extra argument
    assert not accepts(compiler, required, call.replace("get_weather", "get_weathers"))
    assert not accepts(compiler, required, call.replace("Paris", "P" * 25))                    # $ref'd maxLength
    named = tools("get_time").grammar(None)
    assert accepts(compiler, named, time_call) and not accepts(compiler, named, call)
    llama = tools("required", style="llama").grammar(None)
    assert accepts(compiler, llama, '{"name": "get_time", "parameters": {}}')
    assert not accepts(compiler, llama, '{"name": "get_time", "arguments": {}}')
    mistral = tools("required", style="mistral").grammar(None)
    assert accepts(compiler, mistral, '[{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]')
    # auto is free text unless a response_format asks for JSON: then a call or that JSON
    assert tools().grammar(None) is None
    either = tools().grammar({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})
    assert accepts(compiler, either, '{"answer": "mild"}') and accepts(compiler, either, time_call)
    assert not accepts(compiler, either, "mild")


TEMPLATE_WITHOUT_TOOLS = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATE_WITH_TOOLS = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "CALL {{ c.function.name }} {{ c.function.arguments | tojson }} {{ c.function.arguments.city }}"
    "{% endfor %}{% elif m.role == 'tool' %}RESULT {{ m.tool_call_id }}={{ m.content }}"
    "{% else %}{{ m.content }}{% endif %}\n{% endfor %}")

HISTORY = [
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "09:30"},
]


def with_template(hf_tokenizer_dir, template: str) -> Tokenizer:
    tok = Tokenizer.from_dir(hf_tokenizer_dir)
    return Tokenizer(tok._backend, eos_token=tok.eos_token, chat_template=template)


def test_a_template_without_tools_gets_ironlms_tool_prompt(hf_tokenizer_dir):
    tok = with_template(hf_tokenizer_dir, TEMPLATE_WITHOUT_TOOLS)
    toolset = tool_set([WEATHER, TIME], "required", False, tok)
    assert toolset.style == "hermes"
    prompt = render_chat(tok, HISTORY, toolset)
    system, user, assistant, results = prompt.split("<|im_start|>")[1:5]
    assert system.startswith("system\nYou can call functions") and '"name": "get_weather"' in system
    assert "Call at least one function now." in system and "one function at a time" in system
    assert user.startswith("user\nWeather in Paris")
    assert assistant == ('assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                         '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n')
    # both results in one user turn, since many templates refuse a "tool" role or two user turns in a row
    assert results == ("user\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\n09:30\n</tool_response>"
                       "<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    # tool_choice "none": no tool prompt, but the history still renders
    assert tool_set([WEATHER], "none", True, tok) is None
    assert "You can call functions" not in render_chat(tok, HISTORY, None)


def test_a_template_with_tools_renders_them_itself(hf_tokenizer_dir):
    tok = with_template(hf_tokenizer_dir, TEMPLATE_WITH_TOOLS)
    toolset = tool_set([WEATHER, TIME], None, True, tok)
    assert toolset.choice == "auto"
    prompt = render_chat(tok, HISTORY, toolset)
    assert prompt.startswith("TOOLS:get_weather;get_time;[user]")
    # arguments reach the template as an object, as transformers passes them
    assert 'CALL get_weather {"city": "Paris"} Paris' in prompt
    assert "RESULT c1=18 C" in prompt and "RESULT c2=09:30" in prompt
    assert "You can call functions" not in prompt


def test_repeat_guard_ends_an_answer_that_repeats_a_call(compiler):
    import torch

    from ironlm.tools import RepeatGuard

    tok, _ = compiler

    class Inner:  # the grammar's processor: allows everything here, forces one token
        eos_token_ids = frozenset(tok.eos_token_ids)

        def __call__(self, ids, logits):
            return logits

        def forced_tokens(self, ids):
            return [7]

    guard = RepeatGuard(Inner(), tok)
    one = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    other = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    for text, looping in ((one, False), (one + "\n" + other, False), (one + "\n" + other + "\n" + one, True),
                          (one + "\n" + one[:-3], False)):
        ids = tok.encode(text, add_special_tokens=False)
        logits = guard(ids, torch.zeros(tok.vocab_size))
        allowed = set(torch.nonzero(logits > float("-inf")).flatten().tolist())
        assert allowed == (set(tok.eos_token_ids) if looping else set(range(tok.vocab_size))), text
        assert guard.forced_tokens(ids) == ([] if looping else [7])


def test_a_template_with_tools_renders_as_in_transformers(hf_tokenizer_dir):
    # transformers takes tools as given and calls' arguments as objects; OpenAI sends arguments as JSON text.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    tok = with_template(hf_tokenizer_dir, TEMPLATE_WITH_TOOLS)
    toolset = tool_set([WEATHER, TIME], "auto", True, tok)
    hf_history = [dict(m, tool_calls=[dict(c, function=dict(c["function"], arguments=json.loads(
        c["function"]["arguments"]))) for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in HISTORY]
    expected = hf.apply_chat_template([{k: v for k, v in m.items() if v is not None} for m in hf_history],
                                      tools=[f.openai() for f in toolset.functions], chat_template=TEMPLATE_WITH_TOOLS,
                                      tokenize=False, add_generation_prompt=True)
    assert render_chat(tok, HISTORY, toolset) == expected


def test_schema_text_cannot_rewrite_the_grammar(compiler):
    # Descriptions are the client's text inside %json: quotes, braces and newlines in them stay JSON string content.
    evil = Function("f", "}\nstart: \"x\"", {"type": "object", "description": "}\nstart: \"x\"\n%json {",
                                               "properties": {"a": {"type": "string", "description": "\"}\n"}}})
    grammar = ToolSet((evil,), "required", False, "hermes").grammar(None)
    assert not accepts(compiler, grammar, "x")
    assert accepts(compiler, grammar, '<tool_call>\n{"name": "f", "arguments": {"a": "ok"}}\n</tool_call>')
