"""Hardware facts: sane on this machine, robust to missing files, and `ironlm info` well-formed."""
import argparse
import json
import os
from pathlib import Path

import pytest

from ironlm import hardware
from ironlm.errors import IronlmError


def test_cpu_info_is_sane():
    info = hardware.cpu_info()
    assert 1 <= info.physical_cores <= info.logical_cpus
    assert info.logical_cpus == len(os.sched_getaffinity(0))
    assert info.memory_bytes is None or info.memory_bytes > 0
    assert info.numa_nodes is None or info.numa_nodes >= 1
    assert set(hardware.CPUINFO_FLAGS) <= set(info.features)
    assert info.isa_reason


def test_features_match_proc_cpuinfo():
    flags = hardware.cpuinfo_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    features = hardware.cpu_info().features
    for key, flag in hardware.CPUINFO_FLAGS.items():
        # Linux lists a vector extension only when it also saves its registers, as our check does.
        assert features[key] == (flag in flags), key


def test_default_threads_env_override(monkeypatch):
    monkeypatch.setenv("IRONLM_THREADS", "3")
    assert hardware.default_threads() == 3
    monkeypatch.setenv("IRONLM_THREADS", "zero")
    with pytest.raises(IronlmError, match="IRONLM_THREADS"):
        hardware.default_threads()
    monkeypatch.delenv("IRONLM_THREADS")
    assert hardware.default_threads() == hardware.available_cores(hardware.cpu_info())


def _fake_topology(root: Path, cores: dict[int, tuple[int, int]]) -> None:
    for cpu, (package, core) in cores.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    # 2 packages x 2 cores x 2 threads.
    _fake_topology(tmp_path, {cpu: (cpu // 4, (cpu // 2) % 2) for cpu in range(8)})
    assert hardware.physical_cores(set(range(8)), str(tmp_path)) == 4
    assert hardware.physical_cores({0, 1}, str(tmp_path)) == 1  # affinity limited to one core's two threads
    assert hardware.physical_cores({0, 2, 4}, str(tmp_path)) == 3


def test_missing_files_fall_back(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nphysical id\t: 0\ncore id\t: 0\n\nprocessor\t: 1\nphysical id\t: 0\n"
                       "core id\t: 0\n\nprocessor\t: 2\nphysical id\t: 0\ncore id\t: 1\n")
    assert hardware.physical_cores({0, 1, 2}, str(tmp_path / "nope"), str(cpuinfo)) == 2
    assert hardware.physical_cores({0, 1, 2}, str(tmp_path / "nope"), str(tmp_path / "nope")) == 3
    assert hardware.numa_nodes(str(tmp_path / "nope")) is None
    assert hardware.cgroup_cpu_quota([tmp_path / "nope"]) is None or Path("/sys/fs/cgroup/cpu").exists()
    assert hardware.cgroup_memory_limit([tmp_path]) is None or Path("/sys/fs/cgroup/memory").exists()


def test_last_level_cache_is_the_highest_level(tmp_path):
    for name, level, size in [("index0", "1", "48K"), ("index2", "2", "2048K"), ("index3", "3", "266240K"),
                              ("index4", "x", "9M")]:  # a malformed entry is skipped
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(level + "\n")
        (tmp_path / name / "size").write_text(size + "\n")
    assert hardware.last_level_cache_bytes(str(tmp_path)) == 260 << 20
    assert hardware.last_level_cache_bytes(str(tmp_path / "missing")) is None


def test_numa_nodes_spanned_by_this_process(tmp_path):
    from ironlm import info_command

    for node, cpulist in [(0, "0-3,8-11\n"), (1, "4-7,12-15\n"), (2, "\n")]:  # node 2: memory only (CXL)
        (tmp_path / f"node{node}").mkdir()
        (tmp_path / f"node{node}" / "cpulist").write_text(cpulist)
    assert hardware.numa_nodes(str(tmp_path)) == 3
    assert hardware.numa_nodes_spanned(set(range(16)), str(tmp_path)) == 2
    assert hardware.numa_nodes_spanned({9, 10}, str(tmp_path)) == 1  # numactl --cpunodebind=0
    assert hardware.numa_nodes_spanned({0}, str(tmp_path / "nope")) is None
    assert "--shard K/2" in info_command._numa({"numa_nodes": 3, "numa_nodes_spanned": 2})
    assert info_command._numa({"numa_nodes": 2, "numa_nodes_spanned": 1}) == "2"


def test_cgroup_limits(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert hardware.cgroup_cpu_quota([tmp_path]) == 1.5
    assert hardware.cgroup_memory_limit([tmp_path]) == 1 << 30
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert hardware.cgroup_cpu_quota([tmp_path]) is None
    assert hardware.cgroup_memory_limit([tmp_path]) is None


def test_available_memory_and_the_kv_cache_default(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20971520 kB\n")
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    assert hardware.available_memory_bytes(str(meminfo), [cgroup]) == 20 << 30  # no cgroup files: MemAvailable
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(f"{1 << 30}\n")
    assert hardware.available_memory_bytes(str(meminfo), [cgroup]) == 20 << 30  # no limit
    (cgroup / "memory.max").write_text(f"{8 << 30}\n")
    assert hardware.available_memory_bytes(str(meminfo), [cgroup]) == 7 << 30  # the limit less what is used
    assert hardware.available_memory_bytes(str(tmp_path / "nope"), [tmp_path / "nope"]) is None
    # Half of what is available less the weights, never below the floor; the old fixed bound where unknown.
    assert hardware.default_kv_cache_bytes(4 << 30, available=20 << 30) == 8 << 30
    assert hardware.default_kv_cache_bytes(4 << 30, available=3 << 30) == hardware.MIN_KV_CACHE_BYTES
    # One asked-for context is held past the share, as far as the memory beyond the weights goes.
    assert hardware.default_kv_cache_bytes(4 << 30, available=20 << 30, at_least=12 << 30) == 12 << 30
    assert hardware.default_kv_cache_bytes(4 << 30, available=20 << 30, at_least=30 << 30) == 16 << 30
    assert hardware.default_kv_cache_bytes(4 << 30, available=20 << 30, at_least=1 << 30) == 8 << 30
    real = hardware.available_memory_bytes()
    assert real is None or 0 <= real <= (hardware.cpu_info().memory_bytes or real)
    monkeypatch.setattr(hardware, "available_memory_bytes", lambda: None)
    assert hardware.default_kv_cache_bytes(4 << 30) == hardware.FALLBACK_KV_CACHE_BYTES
    assert hardware.default_kv_cache_bytes(4 << 30, at_least=3 << 30) == 3 << 30


def test_available_cores_respects_quota():
    info = hardware.cpu_info()
    limited = hardware.CpuInfo(**{**info.__dict__, "physical_cores": 8, "cpu_quota": 1.5})
    assert hardware.available_cores(limited) == 2
    unlimited = hardware.CpuInfo(**{**info.__dict__, "physical_cores": 8, "cpu_quota": None})
    assert hardware.available_cores(unlimited) == 8


def test_default_dtype_follows_bf16_support():
    info = hardware.cpu_info()
    with_bf16 = hardware.CpuInfo(**{**info.__dict__, "features": {"avx512_bf16": True}})
    without = hardware.CpuInfo(**{**info.__dict__, "features": {"avx2": True, "amx_bf16": True}})
    assert hardware.default_dtype(with_bf16) == "bfloat16"
    assert hardware.default_dtype(without) == "float32"  # AMX present but not permitted by the OS


def test_info_json_machine_only(capsys):
    from ironlm import info_command

    parser = argparse.ArgumentParser()
    info_command.add_arguments(parser)
    assert info_command.run(parser.parse_args(["--json", "--no-model"])) == 0
    out = json.loads(capsys.readouterr().out)
    machine = out["machine"]
    assert out["model"] is None
    assert machine["physical_cores"] <= machine["logical_cpus"]
    assert set(machine["features"]) == {key for key, _ in info_command.FEATURE_LABELS}
    assert machine["default_dtype"] in ("float32", "bfloat16")
    assert machine["default_kv_cache_dtype"] == "bfloat16"
    assert machine["default_threads"] >= 1
    assert machine["decode_prefetch"].startswith(("into L1 (", "into L2"))
    # Which instructions each weight format's GEMM uses, with the measured vdpbf16ps rate where it decides.
    from ironlm import _kernels
    from ironlm.quant import FORMATS

    kernels = machine["gemm_kernels"]
    assert set(kernels) == set(FORMATS)
    in_use, ratio = _kernels.bf16_dot()
    if machine["active_isa"] in ("avx512_bf16", "amx"):
        assert f"measured at {ratio:.2f}x" in kernels["bf16"] and ("vdpbf16ps," in kernels["bf16"]) == in_use
    else:
        assert "measured" not in kernels["bf16"]


def test_info_table_with_model(tmp_path, capsys):
    from ironlm import info_command
    from ironlm.bench.shapes import build_shape_model, num_params

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 1024, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    model_dir = build_shape_model("tiny", tmp_path, config=config)
    parser = argparse.ArgumentParser()
    info_command.add_arguments(parser)
    assert info_command.run(parser.parse_args(["-m", str(model_dir), "--json"])) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["num_params"] == num_params(config)
    assert model["tensors_by_dtype"] == {"BF16": 2 * 9 + 3}
    assert model["weight_bytes"] == 2 * num_params(config)
    assert (model["num_hidden_layers"], model["num_key_value_heads"], model["head_dim"]) == (2, 2, 16)
    # A token's K and V rows: 2 layers x 2 (K, V) x 2 kv heads of 16 dims, as bf16 or int8 plus a float scale.
    assert model["kv_bytes_per_token"] == {"bfloat16": 8 * 16 * 2, "int8": 8 * (16 + 4)}
    assert model["default_kv_cache_bytes"] >= hardware.MIN_KV_CACHE_BYTES
    assert model["chat_template"] is (model["tools"] is not None)
    assert info_command.run(parser.parse_args(["--json"])) == 0  # the embedded SmolLM2: no tools in its template
    default = json.loads(capsys.readouterr().out)["model"]
    assert default["chat_template"] and default["tools"] == "ironlm's tool prompt; calls in the hermes shape"
    assert info_command.run(parser.parse_args(["-m", str(model_dir)])) == 0
    text = capsys.readouterr().out
    assert "AVX2" in text and "Parameters" in text and f"{num_params(config):,}" in text
    assert "tokens in bf16" in text
