"""/v1/files and /v1/batches end to end with the official openai client on loopback, on a real (tiny) engine:
results, failures, validation, cancel, and a server restart that resumes a batch in progress."""
import collections
import json
import random
import time

import httpx
import openai
import pytest

from ironlm import LLM
from ironlm.engine.async_engine import AsyncEngine
from ironlm.jobs.batch_api import create_batch_router
from ironlm.server.app import create_app
from test_jobs_support import chat_line, fake_note_en, fake_note_zh, tiny_chat_model
from test_server_support import LiveServer


@pytest.fixture(scope="module")
def model_dir(make_tiny_model, hf_tokenizer_dir):
    return tiny_chat_model(make_tiny_model, hf_tokenizer_dir)


def start_server(model_dir, state_dir, max_in_flight: int = 8) -> LiveServer:
    llm = LLM(str(model_dir), dtype="float32", threads=1, max_num_seqs=8)
    async_engine = AsyncEngine(llm.engine)
    app = create_app(async_engine)
    app.include_router(create_batch_router(async_engine, state_dir, (llm.model_name, "default"), max_in_flight))
    return LiveServer(app)


@pytest.fixture(scope="module")
def live(model_dir, tmp_path_factory):
    server = start_server(model_dir, tmp_path_factory.mktemp("state"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def wait(client, batch_id: str, until=("completed", "failed", "cancelled"), timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until or time.monotonic() > deadline:
            return batch
        time.sleep(0.1)


def test_chat_batch_end_to_end(client, model_dir):
    rng = random.Random(5)
    records = [chat_line(f"zh-{i}", fake_note_zh(rng)) for i in range(3)]
    records += [chat_line(f"en-{i}", fake_note_en(rng), model="default") for i in range(3)]
    records.append(chat_line("named", "hi", model=model_dir.name))
    records.append(chat_line("json", "hi", max_tokens=12, logprobs=True, response_format={"type": "json_object"}))
    records.append(chat_line("bad", "hi", top_p=3))
    uploaded = client.files.create(file=("notes.jsonl", jsonl(records)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(records))
    assert client.files.retrieve(uploaded.id).filename == "notes.jsonl"
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"ward": "synthetic"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"ward": "synthetic"}
    batch = wait(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (9, 8, 1)
    outputs = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in outputs) == sorted(r["custom_id"] for r in records[:-1])
    assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["object"] == "chat.completion"
               for o in outputs)
    json_choice = next(o for o in outputs if o["custom_id"] == "json")["response"]["body"]["choices"][0]
    assert json_choice["message"]["content"].startswith("{") and json_choice["logprobs"]["content"]
    assert [e["custom_id"] for e in errors] == ["bad"] and errors[0]["response"]["body"]["error"]["param"] == "top_p"
    assert batch.id in [b.id for b in client.batches.list()]
    assert {uploaded.id, batch.output_file_id} <= {f.id for f in client.files.list()}
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_completions_batch(client):
    records = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                "body": {"prompt": f"Patient {i}:", "max_tokens": 3, "n": 2}} for i in range(3)]
    uploaded = client.files.create(file=("c.jsonl", jsonl(records)), purpose="batch")
    batch = wait(client, client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                               completion_window="24h").id)
    assert batch.status == "completed" and batch.error_file_id is None
    outputs = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert all(len(o["response"]["body"]["choices"]) == 2 for o in outputs) and len(outputs) == 3


def test_invalid_lines_fail_the_batch_with_line_numbers(client):
    good = chat_line("a", "hi")
    records = [good, dict(good), dict(good, custom_id="b", url="/v1/completions"),
               dict(good, custom_id="c", body=dict(good["body"], model="other-model"))]
    uploaded = client.files.create(file=("bad.jsonl", jsonl(records)), purpose="batch")
    batch = wait(client, client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                               completion_window="24h").id)
    assert batch.status == "failed"
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "duplicate_custom_id"), (3, "mismatched_url"), (4, "model_not_found")]


def test_bad_requests_are_rejected(client, live):
    uploaded = client.files.create(file=("x.jsonl", jsonl([chat_line("a", "hi")])), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="1h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-" + "0" * 32, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_../../etc")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    r = httpx.post(live.url + "/v1/files", content=b"not multipart", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def slow_records(num: int, max_tokens: int = 16) -> list[dict]:
    return [chat_line(f"s{i}", f"note {i}", max_tokens=max_tokens, ignore_eos=True) for i in range(num)]


def test_cancel_stops_a_running_batch(client):
    uploaded = client.files.create(file=("slow.jsonl", jsonl(slow_records(40))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait(client, batch.id, until=("in_progress",))
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait(client, batch.id)
    assert batch.status == "cancelled" and batch.request_counts.completed < 40
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)
    lines = client.files.content(batch.output_file_id).text.splitlines()
    assert len(lines) == batch.request_counts.completed


def test_restart_resumes_a_batch_in_progress(model_dir, tmp_path):
    num = 64  # enough work that the batch is still running when the server stops, however fast the CPU
    server = start_server(model_dir, tmp_path, max_in_flight=2)
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30) as client:
            uploaded = client.files.create(file=("slow.jsonl", jsonl(slow_records(num, max_tokens=64))),
                                           purpose="batch")
            batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            deadline = time.monotonic() + 60
            while client.batches.retrieve(batch.id).request_counts.completed < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        server.stop()  # a shutdown in the middle of the batch
    saved = json.loads((tmp_path / "batches" / f"{batch.id}.json").read_text())
    assert saved["batch"]["status"] == "in_progress"
    done_before = saved["batch"]["request_counts"]["completed"]
    assert 0 < done_before < num

    server = start_server(model_dir, tmp_path, max_in_flight=4)
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30) as client:
            batch = wait(client, batch.id)
            assert batch.status == "completed" and batch.request_counts.completed == num
            ids = [json.loads(line)["custom_id"] for line in client.files.content(batch.output_file_id).text.splitlines()]
    finally:
        server.stop()
    assert collections.Counter(ids) == collections.Counter(f"s{i}" for i in range(num))
