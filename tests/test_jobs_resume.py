"""Kill a real batch job with SIGKILL at random points, many times, resuming after each; then Ctrl-C it.
In the end every custom_id is in output or errors exactly once: nothing lost, nothing repeated."""
import collections
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from test_jobs_support import chat_line, read_jsonl, tiny_chat_model, write_jsonl

NUM_ITEMS = 120  # enough work that the job is still running after several kills, however fast the CPU
BAD = {7, 23, 88}  # items with an invalid body: they belong in the error file


@pytest.fixture(scope="module")
def model_dir(make_tiny_model, hf_tokenizer_dir):
    return tiny_chat_model(make_tiny_model, hf_tokenizer_dir)


def count_lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for_growth(proc, paths, before: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        if sum(count_lines(p) for p in paths) > before:
            return
        time.sleep(0.02)


def test_sigkill_at_random_points_then_resume(model_dir, tmp_path):
    seed = int(os.environ.get("IRONLM_TEST_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    lines = []
    for i in range(NUM_ITEMS):
        line = chat_line(f"item-{i}", f"Note {i}: fever and cough.", max_tokens=rng.randint(8, 24), ignore_eos=True)
        if i in BAD:
            line["body"]["top_p"] = 7
        lines.append(line)
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    output, errors = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    command = [sys.executable, "-m", "ironlm.jobs.command", "batch", str(input_path), "-o", str(output),
               "-m", str(model_dir), "--dtype", "float32", "--threads", "1", "--max-num-seqs", "4",
               "--sync-every", "3", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    num_kills = 0
    for round_number in range(7):
        before = count_lines(output) + count_lines(errors)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if round_number % 3 == 0:
            time.sleep(rng.uniform(0.1, 1.5))  # anywhere: start-up, manifest, model load, generating
        else:
            wait_for_growth(proc, (output, errors), before)  # surely while generating and writing
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            assert proc.returncode == 3, (seed, proc.stderr.read())
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        num_kills += 1

    # Ctrl-C stops cleanly (exit 130, nothing torn) when there is still work; then a last run completes.
    if count_lines(output) + count_lines(errors) < NUM_ITEMS:
        before = count_lines(output) + count_lines(errors)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_growth(proc, (output, errors), before)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 3:  # 3: it happened to finish first
            assert proc.returncode == 130, (seed, err)
            assert "Run the same command again" in err and "Traceback" not in err
            assert output.read_bytes().endswith(b"\n")
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 3, (seed, final.stderr)

    done = [r["custom_id"] for r in read_jsonl(output)]
    failed = [r["custom_id"] for r in read_jsonl(errors)]
    counts = collections.Counter(done + failed)
    assert set(counts) == {f"item-{i}" for i in range(NUM_ITEMS)}, seed
    assert max(counts.values()) == 1, (seed, [k for k, v in counts.items() if v > 1])
    assert set(failed) == {f"item-{i}" for i in BAD}, seed
    assert num_kills >= 3, seed
