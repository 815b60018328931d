"""Batch file checks, resume files, text splitting and the runner loop, without a model."""
import json
import os
import random

import pytest

from ironlm.errors import IronlmError, RequestError
from ironlm.jobs.batch_file import check_batch_file, iter_batch_items
from ironlm.jobs.body import Completion
from ironlm.jobs.resume import (DurableAppender, check_manifest, exclusive_lock, finished_ids, lock_path,
                                manifest_path, repair_torn_tail, write_atomic)
from ironlm.jobs.runner import JobRunner, Task
from ironlm.jobs.summarize import detect_language, read_document, scan_documents, split_text
from ironlm.sampling import SamplingParams
from test_jobs_support import chat_line, fake_note_en, fake_note_zh, write_jsonl
from test_server_support import FakeEngine

NAMES = ("tiny", "default")


def test_every_kind_of_bad_line_is_reported_with_its_line_number(tmp_path):
    good = chat_line("a", "hi")
    lines = [
        good,                                                     # 1 ok
        "",                                                       # 2 blank
        "{not json",                                              # 3
        "[1, 2]",                                                 # 4 not an object
        {k: v for k, v in good.items() if k != "custom_id"},      # 5 no custom_id
        dict(good, custom_id=""),                                 # 6 empty custom_id
        good,                                                     # 7 duplicate of line 1
        dict(good, custom_id="m", method="GET"),                  # 8
        dict(good, custom_id="u", url="/v1/embeddings"),          # 9
        dict(good, custom_id="b", body=[1]),                      # 10
        dict(good, custom_id="o", body=dict(good["body"], model="gpt-4o")),  # 11 other model
        dict(good, custom_id="d", body=dict(good["body"], model="default")),  # 12 ok
        dict(good, custom_id="n", body=dict(good["body"], model="tiny")),     # 13 ok
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},  # 14 ok
    ]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    check = check_batch_file(path, NAMES)
    found = {p.line_number: p.code for p in check.problems}
    assert found == {2: "empty_line", 3: "invalid_json", 4: "invalid_json", 5: "missing_custom_id",
                     6: "invalid_custom_id", 7: "duplicate_custom_id", 8: "invalid_method", 9: "invalid_url",
                     10: "invalid_body", 11: "model_not_found"}
    assert "first on line 1" in str(next(p for p in check.problems if p.line_number == 7))
    assert check.num_items == 4 and check.num_problems == 10
    # endpoint mode (/v1/batches): every url must be the batch's
    assert {p.line_number for p in check_batch_file(path, NAMES, "/v1/chat/completions").problems} >= {14}


def test_items_are_read_lazily_and_finished_ones_skipped(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"id{i}", "x") for i in range(5)])
    check = check_batch_file(path, NAMES)
    assert not check.problems and check.num_items == 5 and len(check.sha256) == 64
    items = list(iter_batch_items(path, {"id1", "id3"}))
    assert [(i.custom_id, i.line_number) for i in items] == [("id0", 1), ("id2", 3), ("id4", 5)]


def test_empty_file_is_a_problem(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("")
    assert check_batch_file(path, NAMES).problems


def test_manifest_is_atomic_and_mismatch_refused_without_force(tmp_path):
    out = tmp_path / "out.jsonl"
    manifest = {"kind": "batch", "input_sha256": "a", "model_sha256": "m", "params": {"max_tokens": 4}}
    check_manifest(out, manifest, force=False)
    check_manifest(out, manifest, force=False)  # same job: fine
    with pytest.raises(IronlmError, match="input changed"):
        check_manifest(out, dict(manifest, input_sha256="b"), force=False)
    with pytest.raises(IronlmError, match="max_tokens: 4 -> 8"):
        check_manifest(out, dict(manifest, params={"max_tokens": 8}), force=False)
    with pytest.raises(IronlmError, match="model changed"):
        check_manifest(out, dict(manifest, model_sha256="n"), force=False)
    check_manifest(out, dict(manifest, input_sha256="b"), force=True)
    assert json.loads(manifest_path(out).read_text())["input_sha256"] == "b"
    assert not list(tmp_path.glob("*.tmp"))


def test_output_without_manifest_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"custom_id": "x"}\n')
    with pytest.raises(IronlmError, match="no manifest"):
        check_manifest(out, {"input_sha256": "a"}, force=False)


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "m.json"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two" and not (tmp_path / "m.json.tmp").exists()


def test_lock_refuses_a_second_holder_and_leaves_no_file(tmp_path):
    path = tmp_path / "out.jsonl.lock"
    path.write_text("12345\n")  # left by a job that was killed: its lock died with it, the file is reused
    with exclusive_lock(path, lambda pid: f"held by {pid}"):
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(IronlmError, match=f"held by {os.getpid()}"):
            with exclusive_lock(path, lambda pid: f"held by {pid}"):
                pass
        assert path.exists()  # a refused job does not remove the holder's file
    assert not path.exists()
    with exclusive_lock(path, lambda pid: "busy"):  # free again
        pass


def test_folder_search_passes_over_job_results_and_hidden_files(tmp_path):
    docs = tmp_path / "notes"
    (docs / ".git").mkdir(parents=True)
    (docs / "a.txt").write_text("first note")
    (docs / ".draft.txt").write_text("an editor's temporary copy")
    (docs / ".git" / "b.txt").write_text("not a document")
    write_jsonl(docs / "records.jsonl", [{"id": "r1", "text": "second note"}])
    output = docs / "summaries.jsonl"  # this job's results, written beside the documents
    output.write_text('{"custom_id": "a"}\n')
    (docs / "summaries.errors.jsonl").write_text('{"custom_id": "b"}\n')
    own = frozenset({output, docs / "summaries.errors.jsonl", manifest_path(output), lock_path(output)})
    other = docs / "shard1.jsonl"  # another job's, known by its manifest
    other.write_text('{"custom_id": "c"}\n')
    manifest_path(other).write_text("{}")
    (docs / "shard1.errors.jsonl").write_text('{"custom_id": "d"}\n')

    scan = scan_documents([str(docs)], job_files=own)
    assert not scan.problems
    assert [d.custom_id for d in scan.documents] == [str(docs / "a.txt"), "r1"]
    assert sorted(p.name for p in scan.skipped) == [
        "shard1.errors.jsonl", "shard1.jsonl", "summaries.errors.jsonl", "summaries.jsonl"]
    output.write_text('{"custom_id": "a"}\n{"custom_id": "r1"}\n')  # more results: the input is unchanged
    assert scan_documents([str(docs)], job_files=own).sha256 == scan.sha256

    named = scan_documents([str(output), str(other)], job_files=own)  # named on purpose: the other is read
    assert named.problems == [f"{output}: is this job's own output; give the output (-o, --errors) another name",
                              f"{other} line 1: no string field 'text'; pick the field with --text-field"]


def test_nested_fields_of_jsonl_records(tmp_path):
    # Records exported with nested objects: "note.text" and "patient.id" reach inside; a key with a dot wins.
    path = write_jsonl(tmp_path / "export.jsonl", [
        {"patient": {"id": "p-7"}, "note": {"text": "first note"}},
        {"patient": {"id": 8}, "note": {"text": "second note"}, "note.text": "a key with a dot"},
        {"patient": {"id": "p-9"}, "note": "not nested"},
        {"patient": {"id": "p-10"}, "note": {"text": ["not", "a string"]}}])
    scan = scan_documents([str(path)], text_field="note.text", id_field="patient.id")
    assert [d.custom_id for d in scan.documents] == ["p-7", "8"]
    assert [read_document(d, "note.text") for d in scan.documents] == ["first note", "a key with a dot"]
    assert scan.problems == [f"{path} line {n}: no string field 'note.text'; pick the field with --text-field"
                             for n in (3, 4)]


@pytest.mark.parametrize("tail", [b'{"custom_id": "c", "resp', b'\x00\x00\x00\n', b'{"custom_id": "c"}'])
def test_torn_last_line_is_cut(tmp_path, tail):
    path = tmp_path / "out.jsonl"
    whole = b'{"custom_id": "a"}\n{"custom_id": "b"}\n'
    path.write_bytes(whole + tail)
    assert repair_torn_tail(path) == len(tail)
    assert path.read_bytes() == whole
    assert finished_ids(path) == {"a", "b"}
    assert repair_torn_tail(path) == 0


def test_finished_ids_refuses_foreign_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"custom_id": "a"}\nnot json\n{"custom_id": "b"}\n')
    with pytest.raises(IronlmError, match="line 2"):
        finished_ids(path)
    path.write_bytes(b'{"custom_id": "a"}\n{"custom_id": "a"}\n')
    with pytest.raises(IronlmError, match="repeats"):
        finished_ids(path)


def test_appender_syncs_every_few_items(tmp_path):
    path = tmp_path / "out.jsonl"
    appender = DurableAppender(path, sync_every=3, sync_s=1e9)
    for i in range(2):
        appender.append({"custom_id": str(i)})
    assert path.read_bytes() == b""  # still buffered
    appender.append({"custom_id": "2", "text": "病人"})
    assert len(path.read_bytes().splitlines()) == 3  # flushed at the third
    appender.close()
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[2])["text"] == "病人"


def test_long_chinese_document_splits_at_sentences_without_broken_characters():
    text = fake_note_zh(random.Random(3), num_visits=40)
    text = text.replace("\n\n", "", 5)  # some long paragraphs, so sentences must be cut too
    count = len  # about one token per Chinese character
    chunks = split_text(text, 120, count)
    assert len(chunks) > 5
    assert "".join(chunks) == text  # nothing lost, nothing broken: every chunk is whole characters
    for chunk in chunks[:-1]:
        assert count(chunk) <= 120
        assert chunk.rstrip()[-1] in "。！？；", chunk[-20:]  # cut at a sentence (or paragraph) end
    for chunk in chunks:
        chunk.encode("utf-8").decode("utf-8")
        assert "\ufffd" not in chunk


def test_split_prefers_paragraphs_and_hard_splits_runs_without_boundaries():
    paragraphs = [fake_note_en(random.Random(i)) for i in range(6)]
    text = "\n\n".join(paragraphs)
    count = lambda s: len(s.split())
    chunks = split_text(text, count(paragraphs[0]) + count(paragraphs[1]) + 60, count)
    assert "".join(chunks) == text and all(c.endswith("\n") or c is chunks[-1] for c in chunks)
    run = "病" * 1000
    pieces = split_text(run, 100, len)
    assert "".join(pieces) == run and max(map(len, pieces)) == 100


def test_language_detection():
    assert detect_language(fake_note_zh(random.Random(0))) == "zh"
    assert detect_language(fake_note_en(random.Random(0))) == "en"
    assert detect_language("患者 CT 示 left lower lobe pneumonia，给予 ceftriaxone 2g 静滴") == "zh"


def test_runner_keeps_in_flight_bounded_and_finishes_every_task_once():
    engine = FakeEngine(step_s=0.0)
    done, failed = {}, {}

    def task(i: int) -> Task:
        def start():
            if i == 3:
                raise RequestError("bad body")
            prompt = [40 + i % 10] * (200 if i == 5 else 3)  # 5 is too long for the fake engine
            results = yield [(prompt, SamplingParams(max_tokens=2 + i % 3))] * (1 + i % 2)
            if i % 4 == 0:  # a second (reduce) stage
                results = yield [(prompt, SamplingParams(max_tokens=1))]
            return {"n": [r.num_tokens for r in results], "text": results[0].text}
        return Task(f"t{i}", start)

    stats = JobRunner(engine, max_in_flight=3).run((task(i) for i in range(20)), done.__setitem__,
                                                   failed.__setitem__)
    assert set(done) | set(failed) == {f"t{i}" for i in range(20)} and not set(done) & set(failed)
    assert set(failed) == {"t3", "t5"}
    assert engine.max_num_requests <= 3
    assert done["t0"]["n"] == [1] and done["t1"]["n"] == [3, 3]
    assert stats.num_done == 18 and stats.num_failed == 2
    assert not engine.requests  # nothing left behind


def test_runner_aborts_everything_on_interrupt():
    engine = FakeEngine(step_s=0.0)
    calls = []

    def on_step(stats):
        calls.append(stats.num_in_flight)
        if len(calls) == 2:
            raise KeyboardInterrupt

    def start():
        yield [([5, 6], SamplingParams(max_tokens=50))]
        return {}

    with pytest.raises(KeyboardInterrupt):
        JobRunner(engine, max_in_flight=4).run((Task(str(i), start) for i in range(10)), lambda *a: None,
                                               lambda *a: None, on_step)
    assert not engine.requests and engine.num_aborted == 4


def test_completion_is_plain_data():
    assert Completion("x", 1, "stop").finish_reason == "stop"
