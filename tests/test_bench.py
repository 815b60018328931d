"""`ironlm bench`: shapes, probes and their cache, roofline arithmetic, and well-formed output (structure, not speed)."""
import argparse
import json

import numpy as np
import pytest
from safetensors import safe_open

from ironlm.bench import harness, probes
from ironlm.bench.shapes import SHAPES, build_shape_model, num_params, shape_config, tensor_shapes
from ironlm.quant import bf16_rounds_activations

# Parameter counts the model cards / safetensors metadata publish.
PUBLIC_PARAM_COUNTS = {
    "SmolLM2-135M": 134_515_008,
    "SmolLM2-1.7B": 1_711_376_384,
    "Llama-3.2-1B": 1_235_814_400,
    "Qwen2.5-3B": 3_085_938_688,
    "Llama-2-7B": 6_738_415_616,
    "Llama-3-8B": 8_030_261_248,
}

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name", sorted(PUBLIC_PARAM_COUNTS))
def test_shape_parameter_counts_are_exact(name):
    assert num_params(shape_config(name)) == PUBLIC_PARAM_COUNTS[name]


def test_every_shape_is_checked():
    assert set(SHAPES) == set(PUBLIC_PARAM_COUNTS)


def test_qwen2_shape_has_qkv_bias_and_untied_llama_has_lm_head():
    qwen = tensor_shapes(shape_config("Qwen2.5-3B"))
    assert qwen["model.layers.0.self_attn.k_proj.bias"] == (256,)
    assert "lm_head.weight" not in qwen
    assert tensor_shapes(shape_config("Llama-3-8B"))["lm_head.weight"] == (128256, 4096)


def test_tiny_shape_is_written_and_reused(tmp_path):
    model_dir = build_shape_model("tiny", tmp_path, config=TINY)
    assert (model_dir / "tokenizer.json").is_file()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == 1024 and "SmolLM2" in config["ironlm_note"]
    expected = tensor_shapes(TINY)
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(expected)
        total = 0
        for name in f.keys():
            t = f.get_tensor(name)
            assert tuple(t.shape) == expected[name] and str(t.dtype) == "torch.bfloat16"
            total += t.numel()
            if name.endswith("norm.weight"):
                assert bool((t == 1).all())
            else:
                assert 0.005 < float(t.float().std()) < 0.05
    assert total == num_params(TINY)
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert build_shape_model("tiny", tmp_path, config=TINY) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_probes_are_positive_and_cached(cache):
    first = probes.get(1, bandwidth_bytes=1 << 20, flop_iters=1000)
    assert not first.cached
    assert first.bandwidth_read_gb_s > 0 and first.bandwidth_copy_gb_s > 0
    assert first.peak_gflop_s["fp32"] is None or first.peak_gflop_s["fp32"] > 0
    for dtype, kernel in first.peak_kernels.items():
        assert (kernel is None) == (first.peak_gflop_s[dtype] is None)
    assert probes.cache_path().is_file() and str(probes.cache_path()).startswith(str(cache))
    again = probes.get(1, bandwidth_bytes=1 << 20, flop_iters=1000)
    assert again.cached and again.bandwidth_read_gb_s == first.bandwidth_read_gb_s
    fresh = probes.get(1, remeasure=True, bandwidth_bytes=1 << 20, flop_iters=1000)
    assert not fresh.cached
    probes.cache_path().write_text("{not json")
    assert not probes.get(1, bandwidth_bytes=1 << 20, flop_iters=1000).cached  # a broken cache is re-measured


def test_probe_kernel_choice_follows_features():
    assert probes.peak_kernels({}) == {"fp32": None, "bf16": None, "int8": None}
    assert probes.peak_kernels({"avx2": True, "avx_vnni": True}) == {"fp32": "fp32_avx2", "bf16": None,
                                                                      "int8": "int8_avxvnni"}
    assert probes.peak_kernels({"avx2": True}) == {"fp32": "fp32_avx2", "bf16": None, "int8": "int8_avx2"}
    assert probes.peak_kernels({"avx2": True, "avx512f": True})["int8"] is None
    full = probes.peak_kernels({"avx2": True, "avx512f": True, "avx512_bf16": True, "avx512_vnni": True})
    assert full == {"fp32": "fp32_avx512", "bf16": "bf16_avx512", "int8": "int8_avx512"}
    assert probes.read_isa({"avx2": True}) == "avx2"


def test_roofline_arithmetic():
    # 30 GB/s over 1.5 GB per token: 20 tok/s at batch 1, 4x that at batch 4 while memory bound.
    assert harness.decode_roofline(1, 30.0, 1_500_000_000, None, 10**9) == (pytest.approx(20.0), "memory")
    assert harness.decode_roofline(4, 30.0, 1_500_000_000, 1000.0, 10**9) == (pytest.approx(80.0), "memory")
    # 1000 GFLOP/s over 2 x 1e9 FLOPs per token caps any batch at 500 tok/s.
    assert harness.decode_roofline(64, 30.0, 1_500_000_000, 1000.0, 10**9) == (pytest.approx(500.0), "compute")
    assert harness.prefill_roofline(512, 30.0, 1_500_000_000, 1000.0, 10**9) == (pytest.approx(500.0), "compute")
    assert harness.prefill_roofline(8, 30.0, 1_500_000_000, 1000.0, 10**9) == (pytest.approx(160.0), "memory")


@pytest.mark.parametrize("peaks, dtype, expected", [
    ({"fp32": 359.0, "bf16": 174.0, "int8": 1541.0}, "bfloat16", (359.0, "fp32")),  # slow vdpbf16ps: widened
    ({"fp32": 180.0, "bf16": 350.0, "int8": 700.0}, "bfloat16", (350.0, "bf16")),
    ({"fp32": 180.0, "bf16": None, "int8": None}, "bfloat16", (180.0, "fp32")),
    ({"fp32": 180.0, "bf16": 350.0, "int8": 700.0}, "int8", (700.0, "int8")),
    ({"fp32": 180.0, "bf16": 350.0, "int8": 700.0}, "float32", (180.0, "fp32")),
])
def test_compute_peak_per_dtype(peaks, dtype, expected):
    probe = probes.ProbeResult(threads=2, bandwidth_read_gb_s=30.0, bandwidth_copy_gb_s=20.0, read_isa="avx2",
                               peak_gflop_s=peaks, peak_kernels={}, bandwidth_bytes=1 << 20, measured_at="now")
    assert harness.compute_peak(probe, dtype) == expected


def test_weight_bytes_embedding_rule():
    entries = {"model.embed_tokens.weight": ((1000, 10), 20_000), "model.layers.0.mlp.down_proj.weight": ((10, 40), 800),
               "lm_head.weight": ((1000, 10), 20_000)}
    assert harness.weight_bytes(entries, tied=False) == (40_800, 20 + 800 + 20_000)  # one embedding row per token
    tied = {k: v for k, v in entries.items() if k != "lm_head.weight"}
    assert harness.weight_bytes(tied, tied=True) == (20_800, 20_800)
    shapes = {k: v[0] for k, v in entries.items()}
    assert harness.flop_params(shapes, tied=False) == 400 + 10_000
    assert harness.flop_params({k: v[0] for k, v in tied.items()}, tied=True) == 10_000 + 400


def test_summarize_flags_noise():
    assert not harness.summarize([100.0, 102.0, 105.0])["noisy"]
    stat = harness.summarize([80.0, 100.0, 120.0])
    assert stat["noisy"] and stat["median"] == 100.0 and stat["spread_pct"] == pytest.approx(40.0)


def _bench_args(*extra: str) -> argparse.Namespace:
    from ironlm.bench import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(["--prompt-lengths", "8,16", "--batches", "1,2", "--new-tokens", "3", "--repeats", "2",
                              "--warmup", "0", "--decode-prompt-tokens", "4", "--probe-bytes", str(1 << 20),
                              "--probe-iters", "1000", "--dtype", "float32", "--threads", "1", *extra])


def _unit_ok(key: str) -> bool:
    units = ("_tok_s", "_tok_s_min", "_tok_s_max", "_s", "_pct", "_bytes", "_gb_s", "_gflop_s", "_tokens", "_cpus",
             "_cores", "_per_token")
    counts = ("batch", "threads", "num_params", "numa_nodes", "numa_nodes_spanned", "vocab_size", "warmup_runs",
              "repeats", "prompt_tokens")
    return key.endswith(units) or key in counts or "threads" in key


def _numeric_keys(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                yield k, f"{path}.{k}"
            else:
                yield from _numeric_keys(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for item in obj:
            yield from _numeric_keys(item, path)


def test_bench_json_table_and_plot(tmp_path, cache, capsys):
    from ironlm.bench import command

    model_dir = str(build_shape_model("tiny", tmp_path, config=TINY))
    plot = tmp_path / "bench.png"
    assert command.run(_bench_args(model_dir, "--json", "--plot", str(plot), "--sweep", "threads",
                                   "--sweep-max-threads", "1", "--sweep-prefill-tokens", "16")) == 0
    report = json.loads(capsys.readouterr().out)
    assert plot.stat().st_size > 1000
    for key, where in _numeric_keys(report):
        if where.startswith((".probes.peak_gflop_s", ".model.num_matmuls_by_format")):
            continue  # keyed by dtype / format under a unit-named parent
        assert _unit_ok(key), f"{where} has no unit in its name"
    assert [r["prompt_tokens"] for r in report["prefill"]] == [8, 16]
    assert [r["batch"] for r in report["decode"]] == [1, 2]
    facts = report["model"]
    assert facts["num_params"] == num_params(TINY) and facts["dtype"] == "float32"
    # The bf16 matmul weights stay bf16 where the bf16 kernel multiplies float32 activations (--quant auto), else
    # they are widened; the embedding and norms are float32, and of the untied embedding one row is read a token.
    matmul = sum(int(np.prod(s)) for name, s in tensor_shapes(TINY).items() if len(s) == 2 and "embed" not in name)
    matmul_bytes = (4 if bf16_rounds_activations() else 2) * matmul
    other = num_params(TINY) - matmul
    assert facts["weight_bytes"] == matmul_bytes + 4 * other
    assert facts["weight_bytes_per_token"] == matmul_bytes + 4 * (other - 1024 * 64 + 64)
    bw = report["probes"]["bandwidth_read_gb_s"]
    for row in report["decode"]:
        assert row["decode_tok_s_min"] <= row["decode_tok_s"] <= row["decode_tok_s_max"]
        expected, _ = harness.decode_roofline(row["batch"], bw, facts["weight_bytes_per_token"],
                                              report["compute_peak_gflop_s"], facts["flop_params_per_token"])
        assert row["roofline_tok_s"] == pytest.approx(expected)
        assert row["roofline_pct"] == pytest.approx(100 * row["decode_tok_s"] / expected)
    for row in report["prefill"]:
        assert row["prefill_tok_s"] > 0 and row["ttft_s"] > 0 and isinstance(row["noisy"], bool)
    assert report["sweep_threads"]["best_threads_decode"] == 1
    assert report["peak_rss_bytes"] > 0

    assert command.run(_bench_args(model_dir)) == 0
    table = capsys.readouterr().out
    for text in ("Prefill", "Decode", "roofline", "GB/s", "Peak RSS"):
        assert text in table


def test_compare_gguf_conversion_keeps_the_weights(tmp_path):
    import importlib.util
    from pathlib import Path

    import torch

    from ironlm.formats import load_checkpoint

    spec = importlib.util.spec_from_file_location("compare", Path(__file__).parent.parent / "benchmarks" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    model_dir = build_shape_model("tiny", tmp_path, config=TINY)
    gguf_path = tmp_path / "tiny.gguf"
    compare.hf_to_gguf_bf16(model_dir, gguf_path)
    assert compare.gguf_format(gguf_path) == "BF16"
    sizes = compare.gguf_sizes(str(gguf_path))
    matmul = num_params(TINY) - 1024 * 64 - 5 * 64  # all but the (untied) embedding table and the norms
    assert sizes["flop_params_per_token"] == matmul
    assert sizes["weight_bytes_per_token"] == 2 * matmul + 2 * 64 + 4 * 5 * 64  # + one embedding row + F32 norms
    hf, gguf = load_checkpoint(model_dir), load_checkpoint(gguf_path)
    assert set(hf.tensors) == set(gguf.tensors)
    for name, source in hf.tensors.items():  # q/k are permuted for llama.cpp and un-permuted by our reader
        assert torch.equal(source.tensor(torch.float32), gguf.tensors[name].tensor(torch.float32)), name


@pytest.mark.parametrize("kernel,extra", [("gemm", ["--rows", "1,3", "--shapes", "48x64"]),
                                          ("prefill-attention", []), ("decode-attention", [])])
def test_ab_kernels_finds_a_build_equal_to_itself(kernel, extra):
    # The installed build against itself: every case runs and the outputs agree exactly.
    import subprocess
    import sys
    from pathlib import Path

    from ironlm import _kernels

    script = Path(__file__).parent.parent / "benchmarks" / "ab_kernels.py"
    done = subprocess.run([sys.executable, str(script), _kernels.__file__, kernel, "--rounds", "1", *extra],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cases = [line for line in done.stdout.splitlines() if " old " in line]
    assert cases and all("max diff 0.0e+00" in line for line in cases), done.stdout
    bad = subprocess.run([sys.executable, str(script), str(script), kernel], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
