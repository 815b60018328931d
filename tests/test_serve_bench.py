"""benchmarks/serve_bench.py against a live `ironlm serve` of a tiny random Llama: report fields, units, cleanup."""
import importlib.util
import json
import socket
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_bench.py"


@pytest.fixture(scope="module")
def serve_bench():
    spec = importlib.util.spec_from_file_location("serve_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(make_tiny_model, hf_tokenizer_dir) -> Path:
    directory, _ = make_tiny_model("llama", vocab_size=49152, max_position_embeddings=512)
    template = hf_tokenizer_dir / "chat_template.jinja"
    (directory / template.name).write_bytes(template.read_bytes())
    return directory


def test_spawned_ironlm_report(serve_bench, tiny_model_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    max_tokens = 6
    code = serve_bench.main(["--spawn", "ironlm", "--model", str(tiny_model_dir), "--threads", "1",
                             "--clients", "2,1", "--requests-per-client", "2", "--max-tokens", str(max_tokens),
                             "--time-limit", "240", "--json", str(out_json), "--plot", str(out_png), "--markdown"])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["settings"]["clients"] == [1, 2] and report["settings"]["max_tokens"] == max_tokens
    assert report["machine"]["physical_cores"] >= 1
    (run,) = report["runs"]
    assert run["engine"] == "ironlm" and len(report["raw_runs"]) == 1 and "error" not in report["raw_runs"][0]
    assert [level["clients"] for level in run["levels"]] == [1, 2]
    for level in run["levels"]:
        requests = level["clients"] * 2
        assert (level["requests"], level["completed"], level["errors"]) == (requests, requests, 0)
        assert level["output_tokens"] == requests * max_tokens  # ignore_eos: every request writes max_tokens
        assert level["output_tokens_per_request_mean"] == max_tokens
        assert level["output_tokens_per_s"] == pytest.approx(level["output_tokens"] / level["wall_s"])
        # seconds for TTFT and latency, milliseconds for ITL, all within the level's wall time
        assert 0 < level["ttft_p50_s"] <= level["ttft_p90_s"] <= level["wall_s"]
        assert level["ttft_p50_s"] < level["latency_p50_s"] <= level["wall_s"]
        assert 0 < level["itl_p50_ms"] < level["wall_s"] * 1000
        assert level["output_tokens_per_s_repeats"] == [level["output_tokens_per_s"]]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| ironlm | 2 |" in printed and "output tok/s" in printed
    # the spawned server was stopped: its port no longer accepts connections
    command = report["raw_runs"][0]["server_command"]
    port = int(command[command.index("--port") + 1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_prompts_are_distinct_and_carry_ignore_eos(serve_bench):
    bodies = [serve_bench.chat_body(i, "default", 128, True) for i in range(100)]
    assert len({b["messages"][1]["content"] for b in bodies}) == 100
    assert all(b["ignore_eos"] and b["stream"] and b["stream_options"] == {"include_usage": True} for b in bodies)
    assert "ignore_eos" not in serve_bench.chat_body(0, "default", 128, False)
    assert (bodies[0]["temperature"], bodies[0]["top_p"]) == (0.0, 1.0)  # greedy unless asked
    sampled = serve_bench.chat_body(0, "default", 128, True, temperature=0.7, top_p=0.95)
    assert (sampled["temperature"], sampled["top_p"]) == (0.7, 0.95)


def test_summary_counts_errors_and_percentiles(serve_bench):
    ok = [serve_bench.RequestResult(ok=True, output_tokens=10, ttft_s=t, itl_s=0.01, latency_s=t + 0.09)
          for t in (0.1, 0.2, 0.3, 0.4, 0.5)]
    failed = serve_bench.RequestResult(ok=False, error="HTTP 503: busy")
    level = serve_bench.summarise(4, ok + [failed], wall_s=2.0)
    assert (level["requests"], level["completed"], level["errors"]) == (6, 5, 1)
    assert level["error_examples"] == ["HTTP 503: busy"]
    assert level["output_tokens_per_s"] == pytest.approx(25.0)
    assert level["ttft_p50_s"] == pytest.approx(0.3) and level["ttft_p90_s"] == pytest.approx(0.46)
    assert level["itl_p50_ms"] == pytest.approx(10.0)


@pytest.mark.parametrize("argv", [["--spawn", "vllm"], ["--spawn", "llama-server", "/no/such/binary", "--gguf", "x"],
                                  ["--url", "http://127.0.0.1:1/v1", "--clients", "4,x"], []])
def test_bad_arguments_exit_with_usage(serve_bench, argv):
    with pytest.raises(SystemExit) as exc:
        serve_bench.parse_args(argv)
    assert exc.value.code == 2


def test_best_of_repeats_keeps_the_fastest_level(serve_bench):
    def level(clients, tok_s):
        return {"clients": clients, "output_tokens_per_s": tok_s}

    raw = [{"engine": "a", "levels": [level(1, 10.0), level(4, 30.0)]},
           {"engine": "b", "levels": [level(1, 5.0), {"clients": 4, "timed_out": True}]},
           {"engine": "a", "levels": [level(1, 12.0), {"clients": 4, "timed_out": True}]}]
    runs = {run["engine"]: run["levels"] for run in serve_bench.best_of_repeats(raw)}
    assert runs["a"][0]["output_tokens_per_s"] == 12.0 and runs["a"][0]["output_tokens_per_s_repeats"] == [10.0, 12.0]
    assert runs["a"][1]["output_tokens_per_s_repeats"] == [30.0]
    assert runs["b"][1] == {"clients": 4, "timed_out": True}
