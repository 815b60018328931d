"""The server over the real engine: a tiny random Llama with SmolLM2's tokenizer, and `ironlm serve` itself."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from test_server_support import serve

VOCAB = 49152  # SmolLM2's tokenizer, so chat templates and grammars see a real vocabulary


@pytest.fixture(scope="module")
def tiny_llm(make_tiny_model, hf_tokenizer_dir):
    from ironlm import LLM

    directory, _ = make_tiny_model("llama", vocab_size=VOCAB, max_position_embeddings=512)
    template = hf_tokenizer_dir / "chat_template.jinja"
    (directory / template.name).write_bytes(template.read_bytes())
    # int8 weights: the engine thread decodes through kernel graphs, as a served model does
    return LLM(str(directory), dtype="float32", quant="int8", max_num_seqs=16)


@pytest.fixture(scope="module")
def live(tiny_llm):
    server, async_engine = serve(tiny_llm.engine, max_concurrent=64, max_queue=64)
    yield server, async_engine
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live[0].url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_chat_and_completions_streaming_match_non_streaming(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0)
    assert full.usage.completion_tokens == 6 and full.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=client.models.list().data[0].id, messages=messages, max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == full.choices[0].message.content

    completion = client.completions.create(model="default", prompt="Once upon a time", max_tokens=5,
                                           temperature=0, logprobs=1)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == 5 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert "".join(logprobs.tokens) == completion.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == completion.choices[0].text


def test_served_decode_steps_replay_graphs(tiny_llm, client):
    # The engine thread records and replays them like LLM.generate does.
    client.completions.create(model="default", prompt="Once upon a time", max_tokens=4, temperature=0)
    assert tiny_llm.engine.runner.graphs


def test_batched_equals_sequential(live):
    prompts = [[1 + 97 * i + j for j in range(3 + i % 5)] for i in range(16)]

    def body(prompt):
        return {"model": "default", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0}

    def tokens(response) -> tuple:
        choice = response.json()["choices"][0]
        return choice["text"], tuple(choice["logprobs"]["tokens"])

    with httpx.Client(base_url=live[0].url, timeout=120) as http:
        sequential = [tokens(http.post("/v1/completions", json=body(p))) for p in prompts]

    async def together():
        async with httpx.AsyncClient(base_url=live[0].url, timeout=120) as http:
            return await asyncio.gather(*[http.post("/v1/completions", json=body(p)) for p in prompts])

    batched = [tokens(r) for r in asyncio.run(together())]
    assert all(len(t[1]) == 8 for t in sequential)
    assert batched == sequential


def test_fifty_streaming_clients_disconnect(live):
    server, async_engine = live
    body = {"model": "default", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "temperature": 0.8, "stream": True}

    async def one(http):
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return True  # the first event: admitted to the engine; now hang up

    async def run():
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            return await asyncio.gather(*[one(http) for _ in range(50)])

    assert all(asyncio.run(run()))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = async_engine.stats()
        if stats.get("num_running") == 0 and stats.get("num_waiting") == 0 and async_engine.num_requests == 0:
            break
        time.sleep(0.05)
    stats = async_engine.stats()
    assert (stats["num_running"], stats["num_waiting"], async_engine.num_requests) == (0, 0, 0)
    metrics = httpx.get(server.url + "/metrics").text
    assert "ironlm_requests_running 0.0" in metrics
    fresh = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "default", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert fresh.status_code == 200 and fresh.json()["usage"]["completion_tokens"] == 3


def test_echo_scores_the_prompt_as_lm_eval_asks(client, tiny_llm):
    # lm-evaluation-harness scores a continuation with echo=True, logprobs=1, max_tokens=1: the prompt's tokens
    # come back with their logprobs, the first one with none.
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tiny_llm.tokenizer.encode(prompt)
    plain = client.completions.create(model="default", prompt=prompt, max_tokens=1, temperature=0, logprobs=1)
    echoed = client.completions.create(model="default", prompt=prompt, max_tokens=1, temperature=0, logprobs=1,
                                       echo=True)
    choice = echoed.choices[0]
    assert choice.text == prompt + plain.choices[0].text
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 1 and "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    reference = torch.log_softmax(tiny_llm.engine.prompt_logits(ids).float(), dim=-1)  # (T, V)
    for position in range(1, len(ids)):
        assert logprobs.token_logprobs[position] == pytest.approx(float(reference[position - 1, ids[position]]),
                                                                  abs=1e-3)
        best = int(reference[position - 1].argmax())
        assert list(logprobs.top_logprobs[position]) == [tiny_llm.tokenizer.decode([best])]
    assert logprobs.token_logprobs[-1] == pytest.approx(plain.choices[0].logprobs.token_logprobs[0], abs=1e-5)
    assert echoed.usage.prompt_tokens == len(ids)

    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt=prompt, max_tokens=3, temperature=0, echo=True, stream=True) if c.choices)
    full = client.completions.create(model="default", prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert streamed == full.choices[0].text and streamed.startswith(prompt)
    by_ids = client.completions.create(model="default", prompt=ids, max_tokens=2, temperature=0, echo=True)
    assert by_ids.choices[0].text.startswith(prompt)

    # max_tokens=0, as older harnesses send it: the prompt and its logprobs, and nothing generated.
    only = client.completions.create(model="default", prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    assert only.choices[0].text == prompt and only.choices[0].finish_reason == "length"
    assert only.choices[0].logprobs.token_logprobs == logprobs.token_logprobs[:-1]
    assert only.usage.completion_tokens == 0 and only.usage.prompt_tokens == len(ids)
    streamed = [c for c in client.completions.create(model="default", prompt=prompt, max_tokens=0, echo=True,
                                                     stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in streamed) == prompt
    assert streamed[-1].choices[0].finish_reason == "length"


def test_usage_counts_prompt_tokens_from_the_prefix_cache(client):
    messages = [{"role": "system", "content": "You answer questions about parcels. " * 20},
                {"role": "user", "content": "Where is my parcel?"}]
    first = client.chat.completions.create(model="default", messages=messages, max_tokens=2, temperature=0)
    second = client.chat.completions.create(model="default", messages=messages, max_tokens=2, temperature=0, n=2)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 100
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 16 <= cached < first.usage.prompt_tokens  # all but the last, partial block


def test_response_format_json_schema_and_object(client):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    r = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Yes or no?"}], max_tokens=30, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    for choice in r.choices:
        assert json.loads(choice.message.content)["answer"] in ("yes", "no")
        assert choice.finish_reason == "stop"
    r = client.completions.create(model="default", prompt="JSON:", max_tokens=12,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].text.startswith("{")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "x"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}})


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "metric": {"type": "boolean"}},
                   "required": ["city", "metric"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def check_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(arguments) == {"city", "metric"}
        assert arguments["city"] in ("Paris", "Rome") and isinstance(arguments["metric"], bool)
    else:
        assert call.function.name == "get_time" and arguments == {}


def test_tool_choice_required_and_named_give_valid_calls(client):
    # A random model calls tools only because the grammar makes it: every call must name an offered function
    # with arguments its schema allows, and loops of one call end at the repeat.
    pytest.importorskip("llguidance")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
                                       tool_choice="required", max_tokens=250, temperature=0.9, seed=3, n=3)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            check_call(call)
        assert len({(c.function.name, c.function.arguments) for c in choice.message.tool_calls}) == \
            len(choice.message.tool_calls)
    one = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
                                         tool_choice="required", parallel_tool_calls=False, max_tokens=100,
                                         temperature=0.9, seed=4)
    assert len(one.choices[0].message.tool_calls) == 1
    check_call(one.choices[0].message.tool_calls[0])

    # a named function, streamed: no content, one call whose arguments come in pieces, finish_reason "stop" as
    # OpenAI gives it
    chunks = list(client.chat.completions.create(
        model="default", messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], max_tokens=100, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    first, *more = [call for d in deltas for call in d.tool_calls or ()]
    assert first.index == 0 and first.function.name == "get_weather" and more
    assert all(call.index == 0 and call.id is None and call.function.name is None for call in more)
    first.function.arguments += "".join(call.function.arguments for call in more)
    check_call(first)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_python_api_chat_with_tools(tiny_llm):
    pytest.importorskip("llguidance")
    from ironlm import SamplingParams
    from ironlm.errors import RequestError

    conversations = [[{"role": "user", "content": f"The weather in {city}?"}] for city in ("Paris", "Rome")]
    results = tiny_llm.chat(conversations, SamplingParams(max_tokens=100, temperature=0.9, seed=5),
                            tools=[WEATHER_TOOL, TIME_TOOL], tool_choice={"type": "function",
                                                                          "function": {"name": "get_weather"}})
    for result in results:
        call, = result.tool_calls
        assert call.name == "get_weather" and result.finish_reason == "stop"
        assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    auto = tiny_llm.chat(conversations[0], SamplingParams(max_tokens=4, temperature=0), tools=[WEATHER_TOOL])[0]
    assert len(auto.token_ids) == 4  # free text: the random model writes no call
    with pytest.raises(RequestError) as info:
        tiny_llm.chat(conversations[0], tools=[{"type": "function", "function": {"name": "a b"}}])
    assert info.value.param == "tools.0.function.name"
    with pytest.raises(RequestError) as info:
        tiny_llm.chat(conversations[0], tools=[WEATHER_TOOL], tool_choice="always")
    assert info.value.param == "tool_choice"


LLAMA_STYLE_TEMPLATE = (
    "{% if tools %}Respond with {\"name\": function name, \"parameters\": arguments}. {{ tools | tojson }}\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n")
MISTRAL_STYLE_TEMPLATE = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %}{% if false %}[TOOL_CALLS]{% endif %}")


@pytest.mark.parametrize("template, start", [(LLAMA_STYLE_TEMPLATE, '{"name": "get_weather", "parameters": '),
                                             (MISTRAL_STYLE_TEMPLATE, '[{"name": "get_weather", "arguments": ')])
def test_forced_calls_take_the_shape_the_template_teaches(make_tiny_model, template, start):
    pytest.importorskip("llguidance")
    from ironlm import LLM, SamplingParams

    directory, _ = make_tiny_model("llama", vocab_size=VOCAB, max_position_embeddings=512)
    (directory / "chat_template.jinja").write_text(template)
    llm = LLM(str(directory), dtype="float32", max_num_seqs=2)
    result, = llm.chat([{"role": "user", "content": "Weather in Rome?"}], SamplingParams(max_tokens=60, seed=2),
                       tools=[WEATHER_TOOL, TIME_TOOL], tool_choice={"type": "function",
                                                                      "function": {"name": "get_weather"}})
    assert result.text.startswith(start)
    call, = result.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Rome")


def test_tool_history_and_tool_choice_none(client):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "metric": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 18}'}]
    offered = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER_TOOL], max_tokens=5,
                                             temperature=0)
    plain = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER_TOOL], max_tokens=5,
                                           temperature=0, tool_choice="none")
    assert plain.usage.prompt_tokens < offered.usage.prompt_tokens  # no tool prompt with "none"
    counted = httpx.post(str(client.base_url).removesuffix("v1/") + "tokenize",
                         json={"messages": messages, "tools": [WEATHER_TOOL]}, timeout=30).json()
    assert counted["count"] == len(counted["tokens"]) == offered.usage.prompt_tokens
    assert isinstance(plain.choices[0].message.content, str) and plain.choices[0].message.tool_calls is None


def test_logit_bias_forces_and_bans_tokens(client, tiny_llm):
    def first_token(**extra) -> str:
        return client.completions.create(model="default", prompt="The sea", max_tokens=1, temperature=0,
                                         **extra).choices[0].text

    forced = client.completions.create(model="default", prompt="The sea", max_tokens=4, temperature=0,
                                       logit_bias={"50": 100}).choices[0]
    assert forced.text == "BBBB"  # token 50 of SmolLM2's vocabulary is "B"
    greedy_id, = tiny_llm.tokenizer.encode(first_token(), add_special_tokens=False)
    assert first_token(logit_bias={str(greedy_id): -100}) != first_token()


def test_json_processor_masks_exactly_the_tokens_the_grammar_forbids(tiny_llm):
    # Its packed-bit mask against llguidance's byte-per-token one, token by token through a valid answer.
    pytest.importorskip("llguidance")
    import torch

    from ironlm.grammar import GrammarCompiler

    tokenizer = tiny_llm.tokenizer
    schema = {"type": "object", "properties": {"tag": {"enum": ["billing", "shipping"]}, "note": {"type": "string"}},
              "required": ["tag", "note"]}
    processor, reference = GrammarCompiler(tokenizer, VOCAB).compile(schema, 2)
    answer = tokenizer.encode('{"tag": "billing", "note": "late parcel, \u00e9t\u00e9"}', add_special_tokens=False)
    logits = torch.randn(VOCAB + 7)  # a model's vocabulary may be padded past the tokenizer's
    for i in range(len(answer) + 1):
        masked = processor(answer[:i], logits.clone())
        expected = torch.full_like(logits, float("-inf"))
        allowed = torch.frombuffer(bytearray(reference.matcher.compute_logit_bias()), dtype=torch.uint8)[:VOCAB] > 0
        expected[:VOCAB][allowed] = logits[:VOCAB][allowed]
        assert torch.equal(masked, expected), f"after {i} tokens"
        assert 0 < int(allowed.sum()) < VOCAB or i == len(answer)
        if i < len(answer):
            reference.matcher.consume_token(answer[i])
    masked = processor(answer + tokenizer.encode("x", add_special_tokens=False), logits.clone())  # past the end
    assert processor.matcher.is_error()  # so only EOS may follow
    assert torch.isfinite(masked).nonzero().view(-1).tolist() == sorted(tokenizer.eos_token_ids)


def test_python_api_json_schema_gives_each_prompt_its_own_grammar(tiny_llm):
    # One SamplingParams for several prompts: each sequence must follow the grammar from its own state.
    pytest.importorskip("llguidance")
    from ironlm import SamplingParams

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"enum": [1, 2, 3]}},
              "required": ["answer", "n"], "additionalProperties": False}  # closed: the answer always ends
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=3, json_schema=schema)
    results = tiny_llm.generate(["Is it?", "Why not", "Numbers:", "x"], params)
    for result in results:
        answer = json.loads(result.text)
        assert set(answer) == {"answer", "n"} and answer["answer"] in ("yes", "no") and answer["n"] in (1, 2, 3)
        assert result.finish_reason == "stop"
    assert params.logits_processor is None  # the caller's params are left as they were


def test_forced_tokens_are_appended_unsampled(tiny_llm):
    # Keys, quotes and colons the grammar forces go in without a step each; asking for logprobs turns that off,
    # and max_tokens still cuts at its count, forced tokens included.
    pytest.importorskip("llguidance")
    from ironlm import SamplingParams

    schema = {"type": "object", "properties": {"patient_age": {"enum": [30, 40]}, "ward_name": {"enum": ["a", "b"]}},
              "required": ["patient_age", "ward_name"], "additionalProperties": False}
    engine = tiny_llm.engine
    runs = {}
    for logprobs in (None, 0):
        steps = engine.num_steps
        result, = tiny_llm.generate("x", SamplingParams(max_tokens=40, temperature=0, json_schema=schema,
                                                        logprobs=logprobs))
        runs[logprobs] = (result, engine.num_steps - steps)
        assert set(json.loads(result.text)) == {"patient_age", "ward_name"} and result.finish_reason == "stop"
    (fast, fast_steps), (slow, slow_steps) = runs[None], runs[0]
    assert slow_steps == len(slow.token_ids)  # one step a token (the prompt's step gives the first)
    assert fast_steps < slow_steps - 4
    streamed = list(tiny_llm.stream(tiny_llm.tokenizer.encode("x"),
                                    SamplingParams(max_tokens=40, temperature=0, json_schema=schema)))
    assert max(len(out.new_token_ids) for out in streamed) > 1  # a step that took forced tokens with its own
    assert "".join(out.new_text for out in streamed) == fast.text and streamed[-1].token_ids == fast.token_ids
    short, = tiny_llm.generate("x", SamplingParams(max_tokens=3, temperature=0, json_schema=schema))
    assert len(short.token_ids) == 3 and short.finish_reason == "length"


@pytest.mark.parametrize("schema, message", [
    ({"enum": {1, 2}}, "JSON cannot express"), ({"type": "bogus"}, "unsupported JSON schema"),
    ({"enum": ["x" * 100] * 1000}, "larger than")])
def test_python_api_bad_json_schema_is_a_request_error(tiny_llm, schema, message):
    pytest.importorskip("llguidance")
    from ironlm import SamplingParams
    from ironlm.errors import RequestError

    with pytest.raises(RequestError, match=message) as info:
        tiny_llm.generate("hi", SamplingParams(max_tokens=4, json_schema=schema))
    assert info.value.param == "json_schema" and not tiny_llm.engine.sequences


def test_stop_string_ends_the_choice(client):
    full = client.completions.create(model="default", prompt="The sea", max_tokens=10, temperature=0).choices[0]
    words = full.text.split()
    stop = next((w for w in words[1:] if w.strip()), None)
    if stop is None:
        pytest.skip("the random model gave no second word")
    cut = client.completions.create(model="default", prompt="The sea", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[:full.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_prompt_over_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="default", prompt=[5] * 600, max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ironlm_serve_default_model_drains_on_sigterm(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "ironlm.cli", "serve", "--port", str(port),
                                    "--max-model-len", "512", "--log-level", "warning"],
                                   stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        models = httpx.get(url + "/v1/models").json()
        assert models["data"][1]["id"] == "default" and "SmolLM2" in models["data"][0]["id"]

        lines, first = [], threading.Event()

        def stream():
            body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12,
                    "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60)
        process.send_signal(signal.SIGTERM)
        reader.join(120)
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
        assert process.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
