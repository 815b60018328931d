"""`batch` and `summarize` end to end on a tiny random model: outputs, failures, refusals, torn lines."""
import json
import os
import random

import pytest

from ironlm.jobs.command import main
from test_jobs_support import chat_line, fake_note_en, fake_note_zh, read_jsonl, tiny_chat_model, write_jsonl


@pytest.fixture(scope="module")
def model_dir(make_tiny_model, hf_tokenizer_dir):
    return tiny_chat_model(make_tiny_model, hf_tokenizer_dir)


def batch(model_dir, input_path, output, *extra) -> int:
    return main(["batch", str(input_path), "-o", str(output), "-m", str(model_dir), "--dtype", "float32",
                 "--threads", "1", "-q", *extra])


def test_batch_writes_openai_output_and_per_item_failures(model_dir, tmp_path, capsys):
    rng = random.Random(0)
    lines = [chat_line(f"note-{i}", fake_note_en(rng) if i % 2 else fake_note_zh(rng)) for i in range(6)]
    lines[1]["body"]["model"] = "default"
    lines[2]["body"]["model"] = model_dir.name
    lines.append(chat_line("two-choices", "hello", n=2, temperature=0.5, seed=1))
    lines.append({"custom_id": "completion", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": "Patient notes:", "max_tokens": 3}})
    lines.append(chat_line("bad-body", "x", temperature="hot"))
    lines.append({"custom_id": "too-long", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": "word " * 600, "max_tokens": 3}})
    lines.append(chat_line("too-many-tokens", "x", max_tokens=5000))
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    assert batch(model_dir, input_path, output) == 3  # complete, with failures

    results = {r["custom_id"]: r for r in read_jsonl(output)}
    failures = {r["custom_id"]: r for r in read_jsonl(tmp_path / "out.errors.jsonl")}
    assert set(results) == {f"note-{i}" for i in range(6)} | {"two-choices", "completion"}
    assert set(failures) == {"bad-body", "too-long", "too-many-tokens"}
    chat = results["note-0"]
    assert chat["response"]["status_code"] == 200 and chat["error"] is None
    assert chat["id"] == chat["response"]["request_id"]
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == model_dir.name
    assert body["usage"]["completion_tokens"] == len(body["choices"]) * 4 or body["choices"][0]["finish_reason"] == "stop"
    assert [c["index"] for c in results["two-choices"]["response"]["body"]["choices"]] == [0, 1]
    assert results["completion"]["response"]["body"]["object"] == "text_completion"
    assert failures["bad-body"]["response"]["status_code"] == 400
    assert failures["bad-body"]["response"]["body"]["error"]["param"] == "temperature"
    assert failures["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert failures["too-many-tokens"]["response"]["body"]["error"]["param"] == "max_tokens"

    # Running it again finds nothing to do and changes nothing.
    before = output.read_bytes()
    assert batch(model_dir, input_path, output) == 3
    assert output.read_bytes() == before
    assert "Traceback" not in capsys.readouterr().err


def test_bad_lines_refuse_the_job_with_line_numbers(model_dir, tmp_path, capsys):
    good = chat_line("a", "hi")
    input_path = write_jsonl(tmp_path / "in.jsonl", [
        good, "", "{oops", dict(good), dict(good, custom_id="b", url="/v1/images"),
        dict(good, custom_id="c", method="PUT"), {"method": "POST"},
        dict(good, custom_id="d", body=dict(good["body"], model="llama-70b"))])
    output = tmp_path / "out.jsonl"
    assert batch(model_dir, input_path, output) == 2
    err = capsys.readouterr().err
    for number, words in [(2, "blank line"), (3, "not valid JSON"), (4, "duplicate custom_id"), (5, "url"),
                          (6, "method"), (7, "missing custom_id"), (8, "llama-70b")]:
        assert f"in.jsonl: line {number}: " in err and words in err, (number, err)
    assert err.strip().splitlines()[-1].startswith("error: ") and "7 bad line" in err
    assert "Traceback" not in err and not output.exists()


def test_changed_input_or_parameters_are_refused_without_force(model_dir, tmp_path, capsys):
    input_path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"n{i}", "hi") for i in range(3)])
    output = tmp_path / "out.jsonl"
    assert batch(model_dir, input_path, output) == 0
    write_jsonl(input_path, [chat_line(f"n{i}", "hi") for i in range(4)])
    assert batch(model_dir, input_path, output) == 2
    assert "input changed" in capsys.readouterr().err
    assert batch(model_dir, input_path, output, "--max-model-len", "256") == 2
    assert "max_model_len: 512 -> 256" in capsys.readouterr().err
    assert batch(model_dir, input_path, output, "--chat-template", "{{ messages[0].content }}") == 2
    assert "chat_template_sha256" in capsys.readouterr().err  # every prompt would change
    assert len(read_jsonl(output)) == 3
    assert batch(model_dir, input_path, output, "--force") == 0  # keeps the 3, does the new one
    assert sorted(r["custom_id"] for r in read_jsonl(output)) == ["n0", "n1", "n2", "n3"]


def test_resume_keeps_the_context_length_memory_gave(model_dir, tmp_path, monkeypatch, capsys):
    """Where half the free memory bounds the context, the bound moves with the memory free at load. A resumed job
    asks for its first run's length, so it goes on; with too little memory for that, it says what changed."""
    from ironlm import LLM, hardware
    from ironlm.engine.kv_cache import kv_bytes_per_block

    probe = LLM(str(model_dir), dtype="float32", threads=1).engine
    weights = sum(t.nbytes for t in probe.checkpoint.tensors.values())
    per_token = kv_bytes_per_block(probe.args, probe.config.block_size, probe.kv_dtype) // probe.config.block_size
    monkeypatch.setattr(hardware, "MIN_KV_CACHE_BYTES", 0)

    def free_for(tokens: int):  # memory beyond the weights for `tokens` tokens of K/V; the default share is half
        monkeypatch.setattr(hardware, "available_memory_bytes", lambda: weights + tokens * per_token)

    input_path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"n{i}", "hi") for i in range(3)])
    output = tmp_path / "out.jsonl"
    free_for(320)
    assert batch(model_dir, input_path, output) == 0
    assert json.loads((tmp_path / "out.jsonl.manifest.json").read_text())["params"]["max_model_len"] == 160
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:1]))  # as if stopped after the first item
    free_for(1000)  # would give 500 to a new job
    assert batch(model_dir, input_path, output) == 0
    assert sorted(r["custom_id"] for r in read_jsonl(output)) == ["n0", "n1", "n2"]
    output.write_text("".join(lines[:1]))
    free_for(100)
    assert batch(model_dir, input_path, output) == 2
    err = capsys.readouterr().err
    assert "max_model_len: 160 -> 96" in err and "Traceback" not in err


def test_torn_last_line_is_dropped_and_redone(model_dir, tmp_path):
    input_path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"n{i}", "hello") for i in range(4)])
    output = tmp_path / "out.jsonl"
    assert batch(model_dir, input_path, output) == 0
    data = output.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    torn_id = json.loads(data[last_start:])["custom_id"]
    output.write_bytes(data[: last_start + 30])  # a crash in the middle of writing the last line
    assert batch(model_dir, input_path, output) == 0
    records = read_jsonl(output)  # every line parses: the torn one is gone
    assert sorted(r["custom_id"] for r in records) == [f"n{i}" for i in range(4)]
    assert records[-1]["custom_id"] == torn_id


def test_shards_split_a_job_exactly_and_keep_their_own_outputs(model_dir, tmp_path, capsys):
    input_path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"n{i}", "hi") for i in range(12)])
    outputs = [tmp_path / f"out.{k}.jsonl" for k in range(3)]
    for k, output in enumerate(outputs):
        assert batch(model_dir, input_path, output, "--shard", f"{k}/3") == 0
    shares = [{r["custom_id"] for r in read_jsonl(output)} for output in outputs]
    assert all(shares) and sum(map(len, shares)) == 12 and set().union(*shares) == {f"n{i}" for i in range(12)}
    assert json.loads((tmp_path / "out.1.jsonl.manifest.json").read_text())["params"]["shard"] == "1/3"
    # another shard on an output it did not make is refused; so is a shard that is not K/N
    assert batch(model_dir, input_path, outputs[1], "--shard", "0/3") == 2
    assert "shard: '1/3' -> '0/3'" in capsys.readouterr().err
    for bad in ("3/3", "1", "a/2"):
        assert batch(model_dir, input_path, tmp_path / "x.jsonl", "--shard", bad) == 2
        assert "--shard takes K/N" in capsys.readouterr().err
    assert [len(read_jsonl(output)) for output in outputs] == [len(share) for share in shares]


def test_summarize_shards_split_the_documents(model_dir, tmp_path):
    path = write_jsonl(tmp_path / "notes.jsonl", [{"id": f"r{i}", "text": f"Patient {i} is well."} for i in range(6)])
    shares = []
    for k in range(2):
        output = tmp_path / f"s.{k}.jsonl"
        assert main(["summarize", str(path), "-o", str(output), "-m", str(model_dir), "--dtype", "float32",
                     "--threads", "1", "-q", "--max-summary-tokens", "3", "--shard", f"{k}/2"]) == 0
        shares.append({r["custom_id"] for r in read_jsonl(output)})
    assert not shares[0] & shares[1] and shares[0] | shares[1] == {f"r{i}" for i in range(6)}


def test_batch_structured_output_and_logprobs(model_dir, tmp_path):
    # Tagging tickets: each answer must parse against the schema; logprobs come back as the server gives them.
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"tag": {"enum": ["billing", "shipping"]}, "urgent": {"type": "boolean"}},
              "required": ["tag", "urgent"], "additionalProperties": False}
    tagged = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": schema}}
    lines = [chat_line(f"ticket-{i}", f"Parcel {i} is late.", max_tokens=40, n=2, response_format=tagged)
             for i in range(3)]
    lines.append({"custom_id": "object", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": "JSON:", "max_tokens": 12, "response_format": {"type": "json_object"}}})
    lines.append(chat_line("chat-logprobs", "hi", max_tokens=5, temperature=0, logprobs=True, top_logprobs=2))
    lines.append({"custom_id": "logprobs", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": "The sea", "max_tokens": 5, "temperature": 0, "logprobs": 3}})
    lines.append({"custom_id": "echo", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": "The sea", "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}})
    lines.append(chat_line("bad-schema", "x", response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}))
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    assert batch(model_dir, input_path, output) == 3

    bodies = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(output)}
    for i in range(3):
        for choice in bodies[f"ticket-{i}"]["choices"]:
            answer = json.loads(choice["message"]["content"])
            assert set(answer) == {"tag", "urgent"} and answer["tag"] in ("billing", "shipping")
            assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    assert bodies["object"]["choices"][0]["text"].startswith("{")

    chat = bodies["chat-logprobs"]["choices"][0]
    content = chat["logprobs"]["content"]
    assert len(content) == bodies["chat-logprobs"]["usage"]["completion_tokens"] > 0
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry["top_logprobs"]) == 2 and entry["logprob"] == entry["top_logprobs"][0]["logprob"] <= 0
    assert "".join(entry["token"] for entry in content) == chat["message"]["content"]
    completion = bodies["logprobs"]["choices"][0]
    logprobs = completion["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 5
    assert "".join(logprobs["tokens"]) == completion["text"]
    assert all(len(top) == 3 and max(top.values()) == lp for top, lp in zip(logprobs["top_logprobs"],
                                                                           logprobs["token_logprobs"]))
    echo = bodies["echo"]["choices"][0]
    assert echo["text"].startswith("The sea") and len(echo["logprobs"]["tokens"]) == 3  # "The", " sea", and one
    assert echo["logprobs"]["token_logprobs"][0] is None and echo["logprobs"]["token_logprobs"][1] < 0
    assert echo["logprobs"]["token_logprobs"][2] == logprobs["token_logprobs"][0]
    failure, = read_jsonl(tmp_path / "out.errors.jsonl")
    assert failure["custom_id"] == "bad-schema"
    assert failure["response"]["body"]["error"]["param"] == "response_format"


def test_batch_tool_calls(model_dir, tmp_path):
    # Routing tickets to functions: forced calls come back in tool_calls, a bad tool_choice fails its item only.
    pytest.importorskip("llguidance")
    route = {"type": "function", "function": {"name": "route_ticket", "parameters": {
        "type": "object", "properties": {"team": {"enum": ["billing", "shipping"]}}, "required": ["team"]}}}
    lines = [chat_line(f"ticket-{i}", f"Parcel {i} is late.", max_tokens=60, tools=[route], tool_choice="required",
                       parallel_tool_calls=False) for i in range(3)]
    lines.append(chat_line("unknown-tool", "x", tools=[route],
                           tool_choice={"type": "function", "function": {"name": "refund"}}))
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    assert batch(model_dir, input_path, output) == 3

    bodies = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(output)}
    assert set(bodies) == {"ticket-0", "ticket-1", "ticket-2"}
    for body in bodies.values():
        message = body["choices"][0]["message"]
        assert body["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
        call, = message["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "route_ticket"
        assert json.loads(call["function"]["arguments"])["team"] in ("billing", "shipping")
    failure, = read_jsonl(tmp_path / "out.errors.jsonl")
    assert failure["custom_id"] == "unknown-tool"
    assert failure["response"]["body"]["error"]["param"] == "tool_choice"


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(model_dir, tmp_path, capsys):
    from ironlm.jobs.resume import job_lock

    input_path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"n{i}", "hi") for i in range(2)])
    output = tmp_path / "out.jsonl"
    with job_lock(output):  # the first job, still running
        assert batch(model_dir, input_path, output) == 2
        err = capsys.readouterr().err
        assert f"another job (pid {os.getpid()}) is writing" in err and "Traceback" not in err
        assert not output.exists()
    assert batch(model_dir, input_path, output) == 0  # the lock goes with the job that held it
    assert batch(model_dir, input_path, output) == 0 and len(read_jsonl(output)) == 2


def test_summarize_notes_in_both_languages_with_map_reduce(model_dir, tmp_path):
    rng = random.Random(7)
    docs = tmp_path / "notes"
    (docs / "ward").mkdir(parents=True)
    long_zh = fake_note_zh(rng, num_visits=5)
    (docs / "ward" / "zh_long.txt").write_text(long_zh, encoding="utf-8")
    (docs / "en.md").write_text(fake_note_en(rng, 2), encoding="utf-8")
    (docs / "skip.csv").write_text("not a document")
    write_jsonl(docs / "records.jsonl", [
        {"id": "r1", "note": fake_note_en(rng)}, {"id": 2, "note": fake_note_zh(rng)},
        {"id": "empty", "note": "  "}, {"id": "huge", "note": fake_note_en(rng, 40)}])
    output = tmp_path / "summaries.jsonl"
    code = main(["summarize", str(docs), "-o", str(output), "-m", str(model_dir), "--dtype", "float32",
                 "--threads", "1", "-q", "--text-field", "note", "--max-summary-tokens", "6", "--chunk-tokens", "120",
                 "--max-chunks", "12"])
    assert code == 3
    results = {r["custom_id"]: r for r in read_jsonl(output)}
    failures = {r["custom_id"]: r for r in read_jsonl(tmp_path / "summaries.errors.jsonl")}
    zh_id = str(docs / "ward" / "zh_long.txt")
    assert set(results) == {zh_id, str(docs / "en.md"), "r1", "2"}
    assert set(failures) == {"empty", "huge"}
    assert "--max-chunks" in failures["huge"]["error"]["message"]
    assert failures["huge"]["line"] == 4
    zh = results[zh_id]
    assert zh["lang"] == "zh" and zh["num_chunks"] > 2 and zh["num_reduce_steps"] >= 1
    assert results["r1"]["lang"] == "en" and results["2"]["lang"] == "zh" and results["r1"]["num_chunks"] == 1
    assert all(isinstance(r["summary"], str) and r["usage"]["completion_tokens"] > 0 for r in results.values())


def test_summarize_into_json_fields_with_map_reduce(model_dir, tmp_path, capsys):
    # Structured extraction from records: every summary, chunk and combined, is JSON matching the schema.
    pytest.importorskip("llguidance")
    rng = random.Random(3)
    docs = tmp_path / "notes"
    docs.mkdir()
    (docs / "short.txt").write_text(fake_note_en(rng))
    (docs / "long.txt").write_text(fake_note_en(rng, 6))
    schema = {"type": "object", "properties": {"urgent": {"type": "boolean"}, "ward": {"enum": ["a", "b"]}},
              "required": ["urgent", "ward"], "additionalProperties": False}
    output = tmp_path / "fields.jsonl"
    run = ["summarize", str(docs), "-o", str(output), "-m", str(model_dir), "--dtype", "float32", "--threads", "1",
           "-q", "--json-schema", json.dumps(schema), "--max-summary-tokens", "24", "--chunk-tokens", "120"]
    assert main(run) == 0
    records = {r["custom_id"]: r for r in read_jsonl(output)}
    assert records[str(docs / "long.txt")]["num_chunks"] > 1 and records[str(docs / "long.txt")]["num_reduce_steps"]
    for record in records.values():
        assert set(record["data"]) == {"urgent", "ward"} and record["data"]["ward"] in ("a", "b")
        assert json.loads(record["summary"]) == record["data"] and record["finish_reason"] == "stop"

    # Another schema is another job: refused without --force.
    assert main(run[:-6] + ["--json-schema", '{"type": "object"}'] + run[-4:]) == 2
    assert "json_schema" in capsys.readouterr().err
    # An answer the token budget cuts off is a failure, not half a JSON object.
    cut = tmp_path / "cut.jsonl"
    open_schema = {"type": "object", "properties": {"notes": {"type": "string"}}, "required": ["notes"]}
    assert main(["summarize", str(docs / "short.txt"), "-o", str(cut), "-m", str(model_dir), "--dtype", "float32",
                 "--threads", "1", "-q", "--json-schema", json.dumps(open_schema), "--max-summary-tokens", "3"]) == 3
    failure, = read_jsonl(tmp_path / "cut.errors.jsonl")
    assert "did not end within --max-summary-tokens 3" in failure["error"]["message"]


def test_summarize_reports_bad_records_with_their_line(model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "notes.jsonl", [{"text": "a"}, {"body": "b"}, "{broken"])
    code = main(["summarize", str(path), "-o", str(tmp_path / "o.jsonl"), "-m", str(model_dir), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "notes.jsonl line 2: no string field 'text'" in err and "line 3: not valid JSON" in err


def test_summarize_into_the_documents_folder_resumes(model_dir, tmp_path):
    # The output beside the documents must not count as a document on the next run (which would change the
    # input's hash and refuse the resume).
    docs = tmp_path / "notes"
    docs.mkdir()
    for i in range(3):
        (docs / f"n{i}.txt").write_text(fake_note_en(random.Random(i)))
    output = docs / "summaries.jsonl"
    run = ["summarize", str(docs), "-o", str(output), "-m", str(model_dir), "--dtype", "float32", "--threads", "1",
           "-q", "--max-summary-tokens", "4"]
    assert main(run) == 0 and main(run) == 0
    assert sorted(r["custom_id"] for r in read_jsonl(output)) == [str(docs / f"n{i}.txt") for i in range(3)]
    assert not (docs / "summaries.jsonl.lock").exists()


def test_real_tokenizer_chunks_of_a_long_chinese_note_are_whole(model_dir):
    from ironlm.jobs.summarize import split_text
    from ironlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    text = fake_note_zh(random.Random(11), num_visits=8).replace("\n\n", "", 3)
    count = lambda s: len(tokenizer.encode(s, add_special_tokens=False))
    chunks = split_text(text, 100, count)
    assert len(chunks) > 3 and "".join(chunks) == text
    for chunk in chunks:
        assert count(chunk) <= 100 and "\ufffd" not in tokenizer.decode(tokenizer.encode(chunk, add_special_tokens=False))
    assert all(c.rstrip()[-1] in "。！？；" for c in chunks)
