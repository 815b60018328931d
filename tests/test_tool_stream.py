"""Streamed tool calls: the JSON reader that writes arguments out again as they come, and a streamed choice's
content and tool_calls deltas, which must add up to what the whole answer gives, however the text is cut."""
import json
import random

import openai
import pytest

from ironlm.json_reader import END, JsonReader
from ironlm.tool_stream import CallStream
from ironlm.tools import Function, ToolSet
from test_server_support import ScriptedEngine, serve

WEATHER = Function("get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}}})
TIME = Function("get_time", None, {"type": "object", "properties": {}})


def tools(choice="auto", parallel=True, style="hermes") -> ToolSet:
    return ToolSet((WEATHER, TIME), choice, parallel, style)


def cuttings(text: str, rng: random.Random, most: int = 6):
    """text in pieces of 1 to `most` characters, as tokens come."""
    i = 0
    while i < len(text):
        n = rng.randint(1, most)
        yield text[i:i + n]
        i += n


# --- the JSON reader -------------------------------------------------------------------------------------------

def random_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "null"] + (["list", "dict"] * 2 if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice('ab "\\/\n\t\x01é€😀\u2028') for _ in range(rng.randint(0, 6)))
    if kind == "int":
        return rng.choice([0, -1, 7, 10 ** 20, -123456])
    if kind == "float":
        return rng.choice([0.5, -2.25e-7, 1e300, 3.0])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["a", "b", "c", 'k"\\', "ü"]): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def read(text: str, rng: random.Random) -> tuple[JsonReader, list]:
    reader, events = JsonReader(), []
    for piece in cuttings(text, rng):
        events += reader.feed(piece)
    return reader, events


def test_reader_writes_what_json_dumps_writes():
    rng = random.Random(0)
    for _ in range(300):
        value = {"v": random_value(rng)} if rng.random() < 0.5 else [random_value(rng)]
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]),
                          separators=rng.choice([None, (",", ":")])) + rng.choice(["", " \n"])
        reader, events = read(text, rng)
        assert reader.done and not reader.failed
        assert "".join(t for _, t in events if t is not END) == json.dumps(value, ensure_ascii=False)
        assert events[-1] == ((), END)
        # a member's pieces, picked out by path, are that member written out again
        for key, member in enumerate(value) if isinstance(value, list) else value.items():
            path = (key if isinstance(value, list) else key,)
            pieces = [t for p, t in events if p[:1] == path and len(p) >= 1 and t is not END]
            assert "".join(pieces) == json.dumps(member, ensure_ascii=False)


def test_reader_takes_what_json_loads_takes():
    # valid texts with one character dropped, doubled or changed: the reader completes exactly those json.loads takes
    rng = random.Random(1)
    for _ in range(1500):
        text = json.dumps({"v": random_value(rng), "w": [1.5, "x\\"]}, ensure_ascii=rng.random() < 0.5)
        i = rng.randrange(len(text))
        text = rng.choice([text[:i] + text[i + 1:], text[:i] + text[i] + text[i:],
                           text[:i] + rng.choice('{}[],:" \\0e-.tuaxn\x02') + text[i + 1:]])
        try:
            loads = isinstance(json.loads(text), (dict, list))
        except ValueError:
            loads = False
        reader, events = read(text, rng)
        assert (reader.done and not reader.failed) == loads, text
        if loads:
            assert "".join(t for _, t in events if t is not END) == json.dumps(json.loads(text), ensure_ascii=False)


def test_reader_stops_at_the_first_fault():
    for text in ['{"a": 1,}', '{"a" 1}', "[1 2]", '{"a": tru}', '{"a": "\\x"}', '{"a": "\\u12g4"}', '{"a": "b\nc"}',
                 "{]", '{"a": 01}', "{} x"]:
        reader = JsonReader()
        reader.feed(text + " ")
        assert reader.failed, text
    assert JsonReader().feed('{"a": "\\ud83d\\ude00"}')[1] == (("a",), '"😀"')  # a pair of escapes is one character


# --- a streamed choice ---------------------------------------------------------------------------------------------

def stream(toolset: ToolSet, pieces: list[str]):
    """(content sent per piece, tool_calls deltas per piece, content at the end, deltas at the end, called)."""
    s = CallStream(toolset)
    sent = [s.feed(p) for p in pieces]
    rest, deltas, called = s.finish()
    return [c for c, _ in sent], [d for _, d in sent], rest, deltas, called


def assemble(deltas: list[dict]) -> list[tuple[str, str]]:
    """A client's view of the calls: (name, arguments text) per index, checking the header comes first and once."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        if delta["index"] not in calls:
            assert delta["id"].startswith("call_") and delta["type"] == "function" and delta["function"]["name"]
            assert delta["index"] == len(calls)  # calls start in order
            calls[delta["index"]] = {"name": delta["function"]["name"], "arguments": ""}
        else:
            assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
        calls[delta["index"]]["arguments"] += delta["function"]["arguments"]
    return [(c["name"], c["arguments"]) for c in calls.values()]


ANSWERS = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\u00e9\\n"}}\n</tool_call>',
    'Let me look.\n<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
    # a repeat is dropped, as is a last call cut off (the stream keeps what it sent of that one)
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_time", "arguments": {}}'
    '</tool_call><tool_call>{"name": "get_weather", "arguments": {"ci',
    # one that starts as a repeat and is not
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Parma"}}</tool_call>',
    '{"name": "get_weather", "parameters": {"city": "Rome"}}',
    '<|python_tag|>{"name": "get_time", "parameters": {}}',
    '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Nice"}}]',
    '```json\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n```',
    # streamed no further than the first call that cannot be: arguments as a string, the name after the arguments
    '```json\n[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": "{\\"city\\": \\"B\\"}"},'
    ' {"name": "get_time", "arguments": {"x": 1}}]\n```',
    '<tool_call>{"arguments": {"city": "Lyon"}, "name": "get_weather"}</tool_call>'
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
    "The weather in Paris is mild.",
    '{"city": "Paris"}',
    "[1] see the notes",
    "",
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_streamed_calls_and_content_add_up_to_the_whole_answer(answer):
    toolset = tools()
    parsed = toolset.parse(answer)
    whole = [(c.name, c.arguments) for c in parsed.calls]
    rng = random.Random(2)
    for _ in range(60):
        content, deltas, rest, last, called = stream(toolset, list(cuttings(answer, rng)))
        calls = assemble([d for ds in deltas for d in ds] + last)
        if answer.endswith('"ci'):  # the cut-off call went out as far as it was written
            assert calls == whole + [("get_weather", '{"ci')]
        else:
            assert calls == whole
        # the whitespace before calls is dropped, as a whole answer drops it
        assert "".join(content) + rest == (answer[:parsed.content_end].rstrip() if whole else answer)
        assert called == bool(whole)


def test_arguments_go_out_while_the_model_writes_them():
    answer = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Buenos Aires"}}\n</tool_call>'
    content, deltas, rest, last, called = stream(tools(), list(answer))
    early = [d for ds in deltas[:answer.index('"Buenos') + 4] for d in ds]
    assert early[0]["function"] == {"name": "get_weather", "arguments": "{"}  # the header, once the name is read
    assert "".join(d["function"]["arguments"] for d in early) == '{"city": "Bue'
    assert len([ds for ds in deltas if ds]) >= 10 and last == []
    assert assemble([d for ds in deltas for d in ds]) == [("get_weather", '{"city": "Buenos Aires"}')]


def test_a_repeat_is_held_until_it_differs():
    first = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    answer = first + first.replace("Paris", "Parma")
    content, deltas, rest, last, called = stream(tools(), list(answer))
    second = [d for ds in deltas[len(first):] for d in ds if d["index"] == 1]
    # nothing of the second call goes out while it reads as the first one: its header comes with "Parm"
    assert second[0]["function"]["arguments"] == '{"city": "Parm'
    assert stream(tools(parallel=False), list(answer))[1][-1] == []  # one call only, as a whole answer has


def test_content_goes_out_at_once_and_calls_are_held_back():
    content, deltas, rest, last, _ = stream(tools(), ["It is ", "sunny <t", "oday", "."])
    # "<t" may be a call, and the whitespace before one is not its content
    assert content == ["It is", " sunny", " <today", "."] and rest == "" and last == []
    # the marker split across pieces: text before it goes out, nothing of the call as content
    content, deltas, rest, last, _ = stream(tools(), ["Checking.", "\n<tool", '_call>\n{"name": "get_time", ',
                                                      '"arguments": {}}\n</tool_call>'])
    assert "".join(content) == "Checking." and rest == ""
    assert assemble([d for ds in deltas for d in ds]) == [("get_time", "{}")]
    # a bare JSON call is held from its first character; held text that is no call goes out at the end
    assert stream(tools(), [' {"name": "get_weather", ', '"parameters": {"city": "Rome"}}'])[0] == ["", ""]
    content, deltas, rest, last, _ = stream(tools(), ["[1] see ", "the notes"])
    assert content == ["", ""] and rest == "[1] see the notes" and last == []
    # a forced call holds all content
    content, deltas, rest, last, _ = stream(tools(choice="required"), ["<tool_call>", '{"name": "get_time", "a',
                                                                        'rguments": {}}'])
    assert content == ["", "", ""] and rest == ""
    assert assemble([d for ds in deltas for d in ds] + last) == [("get_time", "{}")]


# --- through the server ----------------------------------------------------------------------------------------------

SCRIPT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


@pytest.fixture(scope="module")
def client():
    server, _ = serve(ScriptedEngine(SCRIPT, max_model_len=4096))  # the tool prompt is long in characters
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c
    server.stop()


def test_server_streams_the_calls_a_whole_answer_gives(client):
    request = {"model": "default", "messages": [{"role": "user", "content": "weather?"}],
               "tools": [t.openai() for t in (WEATHER, TIME)]}
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Let me check."

    chunks = [c for c in client.chat.completions.create(**request, stream=True) if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [call.model_dump(exclude_none=True) for c in chunks for call in c.choices[0].delta.tool_calls or ()]
    assert content == whole.message.content and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert assemble(calls) == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert len(calls) > 5  # the arguments came in pieces
    assert len({call["id"] for call in calls if "id" in call}) == 2
