"""The ironlm command as a user runs it: answers, piped chat, and one-line errors with exit code 2."""
import subprocess
import sys

import pytest


def ironlm(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ironlm", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_generate_answers_with_default_model():
    # The README's own question, on the default (native Q4_1) path.
    result = ironlm("generate", "--temperature", "0", "--max-tokens", "32", "Who wrote Romeo and Juliet?")
    assert result.returncode == 0, result.stderr
    assert "Shakespeare" in result.stdout


def test_generate_with_int8_kv_cache():
    result = ironlm("generate", "--kv-cache-dtype", "int8", "--temperature", "0", "--max-tokens", "32",
                    "Who wrote Romeo and Juliet?")
    assert result.returncode == 0, result.stderr
    assert "Shakespeare" in result.stdout


def test_generate_stream_from_stdin():
    result = ironlm("generate", "--stream", "--temperature", "0", "--max-tokens", "16", "-", stdin="Say hello.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_generate_json_schema_from_a_file_and_inline(tmp_path):
    import json

    schema = {"type": "object", "properties": {"author": {"type": "string", "maxLength": 40}},
              "required": ["author"], "additionalProperties": False}
    (tmp_path / "author.json").write_text(json.dumps(schema))
    for given in (str(tmp_path / "author.json"), json.dumps(schema)):
        result = ironlm("generate", "--json-schema", given, "--temperature", "0", "--max-tokens", "48",
                        "Who wrote Romeo and Juliet?")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)  # the grammar's doing; what the 135M names is its own
        assert list(answer) == ["author"] and isinstance(answer["author"], str) and len(answer["author"]) <= 40


@pytest.mark.parametrize("given, message", [
    ("nofile.json", "cannot read the JSON schema file nofile.json"), ("{bad", "not valid JSON"),
    ("[1]", "must be a JSON schema object"), ('{"type": "bogus"}', "unsupported JSON schema")])
def test_bad_json_schema_is_one_line_exit_2(given, message):
    result = ironlm("generate", "--json-schema", given, "hi")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("template, message", [
    ("missing.jinja", "cannot read the chat template file missing.jinja"),
    ("{% for m in messages %}", "chat template of --chat-template has a syntax error")])
def test_bad_chat_template_is_one_line_exit_2(template, message):
    result = ironlm("generate", "--chat-template", template, "hi")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_chat_with_piped_stdin_answers_each_line():
    result = ironlm("chat", "--temperature", "0", "--max-tokens", "24", stdin="Hello!\nWhat is 2 + 2?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.strip()]) >= 2


def test_chat_loop_keeps_the_conversation(gguf_path):
    from ironlm import LLM, SamplingParams
    from ironlm.cli import chat_loop

    llm = LLM(str(gguf_path), dtype="float32", num_kv_blocks=64)
    seen = []
    original = llm.chat_prompt
    llm.chat_prompt = lambda messages: seen.append([dict(m) for m in messages]) or original(messages)
    lines = iter(["My name is Alice.", "What is my name?", "/reset", "Hi", None])
    messages = chat_loop(llm, lambda: next(lines), SamplingParams(max_tokens=8, temperature=0.0), system="Be brief.")
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][1]["content"] == "My name is Alice." and seen[1][2]["content"]
    assert [m["role"] for m in seen[2]] == ["system", "user"]  # /reset kept only the system prompt
    assert messages[-1]["role"] == "assistant"


@pytest.mark.parametrize("make_path, message", [
    (lambda tmp: tmp / "missing", "no such file"),
    (lambda tmp: tmp, "config.json"),
])
def test_bad_model_path_is_one_line_exit_2(tmp_path, make_path, message):
    result = ironlm("generate", "-m", str(make_path(tmp_path)), "hi")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_pickle_checkpoint_is_refused(tmp_path):
    checkpoint = tmp_path / "model.bin"
    checkpoint.write_bytes(b"\x80\x04not really a pickle")
    result = ironlm("generate", "-m", str(checkpoint), "hi")
    assert result.returncode == 2
    assert "unpickle" in result.stderr and "Traceback" not in result.stderr


def test_unsupported_model_type_lists_supported(tmp_path, hf_tokenizer_dir):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    import torch
    from safetensors.torch import save_file

    save_file({"gpt_neox.embed_in.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    result = ironlm("generate", "-m", str(tmp_path), "hi")
    assert result.returncode == 2
    assert "gpt_neox" in result.stderr and "llama" in result.stderr and "qwen3" in result.stderr


def test_prompt_longer_than_context_is_exit_2():
    result = ironlm("generate", "--raw", "--max-tokens", "1", "-", stdin="word " * 9000)
    assert result.returncode == 2
    assert "context" in result.stderr and "Traceback" not in result.stderr


def test_kv_cache_memory_bounds_the_context():
    # 64 MiB of bf16 KV hold 2,912 tokens of the 135M (30 layers x 3 kv heads x 64 dims x 2 x 2 bytes a token).
    result = ironlm("generate", "--kv-cache-memory", "64M", "--raw", "--max-tokens", "1", "-", stdin="word " * 4000)
    assert result.returncode == 2
    assert "KV cache's memory holds 2912" in result.stderr and "--kv-cache-memory" in result.stderr
    assert "Traceback" not in result.stderr
    bad = ironlm("generate", "--kv-cache-memory", "lots", "hi")
    assert bad.returncode == 2
    assert "'lots' is not a memory size" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_sampling_value_is_exit_2():
    result = ironlm("generate", "--top-p", "7", "hi")
    assert result.returncode == 2
    assert "top_p" in result.stderr


def test_a_second_server_on_the_same_batch_folder_is_refused(tmp_path):
    # A server (here: this test) holds the folder; another one would resume the same batches and repeat them.
    from ironlm.jobs.resume import exclusive_lock

    with exclusive_lock(tmp_path / "server.lock", lambda pid: f"held by {pid}"):
        result = ironlm("serve", "--batch-dir", str(tmp_path), "--port", "1", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "another ironlm serve (pid" in result.stderr and "--batch-dir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
