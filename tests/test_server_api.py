"""The OpenAI API surface against a live loopback server backed by a fake engine: shapes, errors, limits, faults."""
import asyncio
import json
import time

import httpx
import openai
import pytest

from test_server_support import FakeEngine, serve

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def live():
    server, async_engine = serve(FakeEngine(), max_body_bytes=20_000)
    yield server, async_engine
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live[0].url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code=None, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == "fake-model"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "abcde"
    assert r.choices[0].finish_reason == "length"
    prompt_len = len("<user>hi<assistant>")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_len, 5, prompt_len + 5)
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=3, seed=7, top_p=0.5, presence_penalty=1.0, stop=["zz"])
    assert r.choices[0].message.content == "abc" and r.usage.completion_tokens == 3


def test_assistant_message_without_content_renders_empty(client):
    r = client.chat.completions.create(model="default", max_tokens=1, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "x"}])
    assert r.usage.prompt_tokens == len("<user>hi<assistant><user>x<assistant>")


def test_tokenize_and_detokenize(live):
    url = live[0].url
    r = httpx.post(url + "/tokenize", json={"model": "default", "prompt": "hi"}, timeout=30)
    assert r.status_code == 200 and r.json() == {"count": 2, "max_model_len": 128, "tokens": [105, 106]}
    r = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.json()["tokens"] == [b + 1 for b in b"<user>hi<assistant>"]
    r = httpx.post(url + "/detokenize", json={"tokens": [105, 106]}, timeout=30)
    assert r.status_code == 200 and r.json() == {"prompt": "hi"}
    assert_error(httpx.post(url + "/detokenize", json={"tokens": [5, 99999]}, timeout=30), 400, param="tokens")
    assert_error(httpx.post(url + "/tokenize", json={}, timeout=30), 400, param="prompt")
    assert_error(httpx.post(url + "/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
                            timeout=30), 400, param="prompt")
    assert_error(httpx.post(url + "/tokenize", json={"model": "gpt-4", "prompt": "x"}, timeout=30), 404,
                 code="model_not_found")
    assert_error(httpx.post(url + "/tokenize", json={"messages": [{"role": "tool", "content": "x"}]}, timeout=30),
                 400, param="messages.0.tool_call_id")


def test_chat_streaming_with_usage_and_n(client):
    stream = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, n=2, stream=True, stream_options={"include_usage": True})
    texts, finish, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == {0: "abcd", 1: "abcd"}
    assert finish == {0: "length", 1: "length"}
    assert usage.completion_tokens == 8


def test_completions_streaming_and_not(client):
    r = client.completions.create(model="default", prompt=["ab", "cd"], max_tokens=3, n=2, logprobs=2)
    assert r.object == "text_completion"
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text == "abc" for c in r.choices)
    assert r.choices[0].logprobs.tokens == ["a", "b", "c"]
    assert r.choices[0].logprobs.token_logprobs == [-0.25] * 3
    assert r.choices[0].logprobs.top_logprobs[0] == {"a": -0.25, "b": -2.0}
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 12
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt=[5, 6, 7], max_tokens=6, stream=True) if c.choices)
    assert text == "abcdef"


def test_raw_sse_shape_ends_with_done(live):
    body = {"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True,
            "logprobs": True, "top_logprobs": 1}
    with httpx.stream("POST", live[0].url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    assert content[0]["choices"][0]["logprobs"]["content"][0]["token"] == "a"
    assert content[0]["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] == -0.25
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_models_health_metrics(live, client):
    assert [m.id for m in client.models.list().data] == ["fake-model", "default"]
    assert client.models.retrieve("default").id == "default"
    assert httpx.get(live[0].url + "/health").status_code == 200
    metrics = httpx.get(live[0].url + "/metrics").text
    for name in ("ironlm_requests_total", "ironlm_generation_tokens_total", "ironlm_time_to_first_token_seconds",
                 "ironlm_inter_token_latency_seconds", "ironlm_queue_depth", "ironlm_kv_cache_usage_ratio",
                 "ironlm_prefix_cache_hit_rate 0.5"):
        assert name in metrics


def test_openai_error_classes(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], n=1000)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="default", prompt="x" * 200, max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "default", "messages": []}, 400, "messages"),
    ({"model": "default", "messages": "hi"}, 400, "messages"),
    ({"model": "default", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ({"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}, 400, "max_tokens"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**30}, 400, "max_tokens"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": 1e308}, 400, "temperature"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99},
     400, "top_logprobs"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"model": "default", "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"model": "default", "prompt": [-1]}, 400, "prompt"),
    ({"model": "default", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"model": 5, "prompt": "x"}, 400, "model"),
    ({"model": "default", "prompt": {"a": 1}}, 400, "prompt"),
    ({"model": "default", "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"model": "default", "prompt": "x", "stop": ["", "y"]}, 400, "stop"),
    ({"model": "default", "prompt": "x", "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ({"model": "default", "prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"model": "default", "prompt": "x", "logit_bias": {"1": 500}}, 400, "logit_bias"),
    ({"model": "default", "prompt": "x", "logit_bias": {"100000000": 5}}, 400, "logit_bias"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
     400, "functions"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "function_call": "auto"},
     400, "function_call"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "my fn"}}]}, 400, "tools.0.function.name"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "retrieval", "function": {"name": "f"}}]}, 400, "tools.0.type"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "f"}}] * 2}, 400, "tools"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
     400, "tool_choice"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "tool_choice": "maybe",
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}],
      "tool_choice": {"type": "function", "function": {"name": "g"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     400, "tools.0.function.parameters"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "4"}]},
     400, "messages.1.tool_call_id"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": []}},
     400, "chat_template_kwargs"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": ["x"]},
     400, "chat_template_kwargs"),
    ({"model": "default", "messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     400, "messages.0.tool_calls"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
])
def test_bad_requests(live, body, status, param):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(live[0].url + path, headers={"content-type": "application/json"}, timeout=30, **kwargs)
    error = assert_error(r, status)
    if param is not None:
        assert error["param"] == param, error


def test_unknown_route_and_method_are_openai_shaped(live):
    assert_error(httpx.get(live[0].url + "/v1/nothing"), 404)
    assert_error(httpx.get(live[0].url + "/v1/chat/completions"), 405)


def test_body_limit_with_length_and_chunked(live):
    big = json.dumps({"model": "default", "prompt": "x" * 30_000}).encode()
    assert_error(httpx.post(live[0].url + "/v1/completions", content=big), 413)

    def chunks():
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = httpx.post(live[0].url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers  # really chunked
    assert_error(r, 413)
    # the server is still fine afterwards
    ok = httpx.post(live[0].url + "/v1/completions", json={"model": "default", "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200


def test_api_key():
    server, _ = serve(FakeEngine(), api_key="s3cret")
    try:
        assert httpx.get(server.url + "/health").status_code == 200
        assert_error(httpx.get(server.url + "/metrics"), 401, code="invalid_api_key")
        assert_error(httpx.get(server.url + "/v1/nothing"), 401)
        with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0) as good:
            assert good.completions.create(model="default", prompt="a", max_tokens=2).choices[0].text == "ab"
    finally:
        server.stop()


def test_overload_gets_429_with_retry_after_at_once():
    engine = FakeEngine(step_s=0.02)
    server, async_engine = serve(engine, max_concurrent=2, max_queue=2)
    body = {"model": "default", "prompt": "a", "max_tokens": 15}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            return await asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(10)])

    try:
        started = time.monotonic()
        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 4 and statuses.count(429) >= 1, statuses
        assert set(statuses) <= {200, 429}
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1"
        assert_error(rejected, 429, code="rate_limit_exceeded")
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            async_ok = client.completions.create(model="default", prompt="a", max_tokens=1)
            assert async_ok.choices[0].text == "a"
        assert time.monotonic() - started < 60
        assert async_engine.num_requests == 0
        assert engine.max_num_requests <= 2  # the engine never held more than the concurrency limit
    finally:
        server.stop()


def test_rate_limit_error_class():
    server, _ = serve(FakeEngine(step_s=0.05), max_concurrent=1, max_queue=0)
    try:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                          json={"model": "default", "prompt": "a", "max_tokens": 40, "stream": True}) as r:
            assert r.status_code == 200
            with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model="default", prompt="a", max_tokens=1)
    finally:
        server.stop()


def test_disconnects_free_requests_streaming_waiting_and_queued():
    engine = FakeEngine(step_s=0.01, max_model_len=10_000)
    server, async_engine = serve(engine, max_concurrent=30, max_queue=100)
    body = {"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000 - 200}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            async def streaming():
                async with http.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as r:
                    async for line in r.aiter_lines():
                        if '"content":"b"' in line:
                            return True  # leave mid-generation; closing the stream disconnects
                return False

            async def waiting():  # non-streaming and queued clients give up
                try:
                    await http.post("/v1/chat/completions", json=body, timeout=0.5)
                except httpx.TimeoutException:
                    return True
                return False

            return await asyncio.gather(*[streaming() for _ in range(25)], *[waiting() for _ in range(25)])

    try:
        assert all(asyncio.run(run()))
        deadline = time.monotonic() + 10
        while (engine.requests or async_engine.num_requests) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.requests == {} and async_engine.num_requests == 0
        assert engine.num_added >= 25 and engine.num_aborted == engine.num_added  # every one of them was aborted, none ran to the end
        r = httpx.post(server.url + "/v1/completions", json={"model": "default", "prompt": "a", "max_tokens": 2},
                       timeout=10)
        assert r.json()["choices"][0]["text"] == "ab"
    finally:
        server.stop()


def test_engine_death_is_reported():
    server, async_engine = serve(FakeEngine(step_s=0.01, fail_at_step=5))
    try:
        body = {"model": "default", "prompt": "a", "max_tokens": 50, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert set(error) == ERROR_KEYS and error["code"] == "engine_dead"
        assert not async_engine.is_alive
        assert_error(httpx.get(server.url + "/health"), 503)
        assert_error(httpx.post(server.url + "/v1/completions", json=dict(body, stream=False)), 503)
    finally:
        server.stop()


def test_drain_refuses_new_work_and_ends_open_streams_at_the_deadline():
    server, async_engine = serve(FakeEngine(step_s=0.01, max_model_len=100_000))
    try:
        body = {"model": "default", "prompt": "a", "max_tokens": 100_000 - 10, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            server.app.state.server.drain(0.2)
            assert_error(httpx.post(server.url + "/v1/completions", json=dict(body, stream=False)), 503,
                         code="shutting_down")
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"
        assert async_engine.num_requests == 0
    finally:
        server.stop()
