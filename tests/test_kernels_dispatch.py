"""Which ISA levels a CPU can run, which one the kernels pick, and how IRONLM_ISA changes that."""

import os
import subprocess
import sys

import pytest

from ironlm import _kernels
from ironlm.quant import QuantLinear
from isa_support import LEVELS, RUNNABLE

AVX2 = {"avx2": True, "f16c": True}
AVX512 = {**AVX2, "avx512f": True, "avx512bw": True, "avx512vl": True, "avx512dq": True}
CPUS = {  # features as cpu_features() names them -> the levels such a CPU runs
    "Haswell": (AVX2, ["scalar", "avx2"]),
    "Alder Lake": ({**AVX2, "avx_vnni": True}, ["scalar", "avx2", "avx_vnni"]),
    "Skylake-X": (AVX512, ["scalar", "avx2", "avx512"]),
    # Zen 4: no AVX-VNNI, so avx_vnni runs in EVEX form on AVX512-VNNI
    "Zen 4": ({**AVX512, "avx512_vnni": True, "avx512_bf16": True},
              ["scalar", "avx2", "avx_vnni", "avx512", "avx512_vnni", "avx512_bf16"]),
    "Sapphire Rapids": ({**AVX512, "avx512_vnni": True, "avx512_bf16": True, "avx_vnni": True, "amx_tile": True,
                         "amx_int8": True, "amx_bf16": True, "amx_os_enabled": True, "amx_permitted": True},
                        LEVELS),
    "Sapphire Rapids, AMX not granted": ({**AVX512, "avx512_vnni": True, "avx512_bf16": True, "avx_vnni": True,
                                          "amx_tile": True, "amx_int8": True, "amx_bf16": True},
                                         LEVELS[:-1]),
    "AVX2 without F16C": ({"avx2": True}, ["scalar"]),
}


@pytest.mark.parametrize("cpu", CPUS)
def test_levels_follow_the_features(cpu):
    features, levels = CPUS[cpu]
    assert _kernels.supported_isas(features) == levels


def test_this_cpu_runs_its_levels():
    assert RUNNABLE == _kernels.supported_isas(dict(_kernels.cpu_features()))
    assert RUNNABLE[-1] == _kernels.best_isa() and RUNNABLE == [level for level in LEVELS if level in RUNNABLE]


def test_unknown_feature_is_an_error():
    with pytest.raises(ValueError, match="unknown feature avx1024"):
        _kernels.supported_isas({"avx1024": True})

    class Unclear:
        def __bool__(self):
            raise ValueError("neither true nor false")

    with pytest.raises(ValueError, match="neither true nor false"):
        _kernels.supported_isas({"avx2": Unclear()})


def active_isa_with(value: str) -> tuple[str, str]:
    code = "from ironlm import _kernels; print(*_kernels.active_isa(), sep='|')"
    env = dict(os.environ, IRONLM_ISA=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    level, why = out.strip().split("|")
    return level, why


@pytest.mark.parametrize("level", ["avx2", "avx_vnni"])
def test_ironlm_isa_picks_a_level(level):
    if level not in RUNNABLE:
        pytest.skip(f"this CPU cannot run {level}")
    assert active_isa_with(level) == (level, f"forced by IRONLM_ISA={level}")


def test_ironlm_isa_rejects_what_the_cpu_lacks():
    missing = [level for level in LEVELS if level not in RUNNABLE]
    if not missing:
        pytest.skip("this CPU runs every level")
    level, why = active_isa_with(missing[-1])
    assert level == _kernels.best_isa()
    assert why == f"IRONLM_ISA={missing[-1]} is not supported by this CPU/OS; using {level}"


def test_ironlm_isa_names_the_levels_when_unknown():
    level, why = active_isa_with("sse9")
    assert level == _kernels.best_isa()
    assert "IRONLM_ISA=sse9 is not a level (" + ", ".join(LEVELS) + ")" in why


@pytest.mark.skipif("avx_vnni" not in RUNNABLE, reason="needs AVX-VNNI or AVX512-VNNI")
def test_avx_vnni_kernel_name_says_its_form():
    """Integer formats run on 256-bit vpdpbusd, in EVEX form where the CPU lacks AVX-VNNI; bf16 as on avx2."""
    import torch

    before = _kernels.active_isa()[0]
    try:
        _kernels.set_isa("avx_vnni")
        evex = not _kernels.cpu_features()["avx_vnni"]
        name = QuantLinear.from_dense(torch.randn(16, 32), None, "int8").kernel
        assert name.startswith("avx_vnni: vpdpbusd ymm") and ("EVEX form" in name) == evex
        assert QuantLinear.from_dense(torch.randn(16, 32), None, "bf16").kernel.startswith("avx2: bf16->fp32 fma")
    finally:
        _kernels.set_isa(before)
