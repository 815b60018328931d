"""Machine limits for the roofline: memory bandwidth and peak arithmetic per dtype, cached per machine.

The measurements are C++ (ironlm._probes, one translation unit per ISA); this module picks the kernels the CPU
can run (from ironlm.hardware features) and keeps results in $XDG_CACHE_HOME/ironlm/probes.json, keyed by CPU
model, cores and features, then by thread count.
"""
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ironlm.errors import IronlmError
from ironlm.hardware import CpuInfo, cpu_info

CACHE_VERSION = 3  # 3: the read probe takes the faster of L1 and L2 prefetching
DEFAULT_BANDWIDTH_BYTES = 1 << 30  # far larger than any cache
DEFAULT_FLOP_ITERS = 500_000       # rounds of 12 vector multiply-adds: ~12 ms per run
# Best of many short runs: on a shared machine some run gets every thread a core of its own.
BANDWIDTH_REPEATS = 10
FLOP_REPEATS = 20


@dataclass
class ProbeResult:
    threads: int
    bandwidth_read_gb_s: float
    bandwidth_copy_gb_s: float
    read_isa: str
    peak_gflop_s: dict[str, float | None]  # "fp32", "bf16", "int8" (int8: G integer ops/s); None = no such instructions
    peak_kernels: dict[str, str | None]     # which micro-kernel measured each dtype
    bandwidth_bytes: int
    measured_at: str
    cached: bool = False


def _probes_module():
    try:
        from ironlm import _probes
    except ImportError as e:
        raise IronlmError(f"ironlm._probes is not built ({e}); reinstall with `pip install --no-build-isolation -e .`")
    return _probes


def read_isa(features: dict[str, bool]) -> str:
    if features.get("avx512f"):
        return "avx512"
    if features.get("avx2"):
        return "avx2"
    return "scalar"


def peak_kernels(features: dict[str, bool]) -> dict[str, str | None]:
    """The widest micro-kernel per dtype that this CPU and OS support (None: no native instructions)."""
    fp32 = "fp32_avx512" if features.get("avx512f") else "fp32_avx2" if features.get("avx2") else None
    bf16 = "bf16_avx512" if features.get("avx512_bf16") else None
    # AVX2 without VNNI: the vpmaddubsw sequence ironlm's AVX2 kernels use (AVX-512 without VNNI runs it on zmm,
    # which no probe measures).
    int8 = ("int8_avx512" if features.get("avx512_vnni") else "int8_avxvnni" if features.get("avx_vnni")
            else "int8_avx2" if features.get("avx2") and not features.get("avx512f") else None)
    return {"fp32": fp32, "bf16": bf16, "int8": int8}


def measure(threads: int, bandwidth_bytes: int = DEFAULT_BANDWIDTH_BYTES, flop_iters: int = DEFAULT_FLOP_ITERS,
            info: CpuInfo | None = None) -> ProbeResult:
    """Run the probes now with `threads` threads (best of several runs each)."""
    probes = _probes_module()
    features = (info or cpu_info()).features
    isa = read_isa(features)
    kernels = peak_kernels(features)
    peaks = {dtype: (probes.peak_gops(kind, threads, flop_iters, FLOP_REPEATS) if kind else None)
             for dtype, kind in kernels.items()}
    return ProbeResult(
        threads=threads,
        bandwidth_read_gb_s=probes.read_bandwidth(bandwidth_bytes, threads, BANDWIDTH_REPEATS, isa),
        bandwidth_copy_gb_s=probes.copy_bandwidth(bandwidth_bytes, threads, BANDWIDTH_REPEATS),
        read_isa=isa,
        peak_gflop_s=peaks,
        peak_kernels=kernels,
        bandwidth_bytes=bandwidth_bytes,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def cache_path() -> Path:
    """$XDG_CACHE_HOME/ironlm/probes.json (default ~/.cache/ironlm/probes.json)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ironlm" / "probes.json"


def machine_key(info: CpuInfo) -> str:
    features = ",".join(sorted(name for name, on in info.features.items() if on))
    return f"{info.model_name}|{info.physical_cores}c/{info.logical_cpus}t|{features}"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("machines"), dict):
        return {}
    return data


def get(threads: int, remeasure: bool = False, bandwidth_bytes: int = DEFAULT_BANDWIDTH_BYTES,
        flop_iters: int = DEFAULT_FLOP_ITERS, info: CpuInfo | None = None) -> ProbeResult:
    """Probe results for this machine at `threads` threads: from the cache unless missing or `remeasure`."""
    info = info or cpu_info()
    path = cache_path()
    data = _load_cache(path) or {"version": CACHE_VERSION, "machines": {}}
    entries = data["machines"].setdefault(machine_key(info), {})
    cached = entries.get(str(threads))
    # A probe over a smaller buffer may have measured a cache, not memory: only reuse a same-size measurement.
    if cached is not None and not remeasure and cached.get("bandwidth_bytes") == bandwidth_bytes:
        try:
            return ProbeResult(**{**cached, "cached": True})
        except TypeError:
            pass  # an entry from another layout: measure again
    result = measure(threads, bandwidth_bytes, flop_iters, info=info)
    entries[str(threads)] = {k: v for k, v in asdict(result).items() if k != "cached"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file, never half of one
    return result
