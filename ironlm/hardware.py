"""CPU facts: ISA features, physical cores, memory, NUMA; the thread and dtype defaults that follow from them.

Every source is optional: a file that is missing or unreadable leaves its fact as `None` (or falls back to a
coarser source), so this module works in containers, VMs and on non-Linux machines.
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ironlm.errors import IronlmError

# Names as ironlm._kernels.cpu_features() reports them -> the /proc/cpuinfo flag for the same CPUID bit.
CPUINFO_FLAGS = {
    "avx2": "avx2",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512dq": "avx512dq",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx_vnni": "avx_vnni",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
}


@dataclass(frozen=True)
class CpuInfo:
    """What this process can use of the machine. `None` means not detected."""

    model_name: str | None
    physical_cores: int                # physical cores in this process's CPU affinity (>= 1)
    logical_cpus: int                  # logical CPUs in this process's CPU affinity
    features: dict[str, bool]          # ISA features usable here (CPU has them and the OS saves their state)
    memory_bytes: int | None           # MemTotal, or the cgroup memory limit when smaller
    numa_nodes: int | None
    active_isa: str | None             # the kernel ISA level ironlm dispatches to
    isa_reason: str                    # why that level
    cpu_quota: float | None = None     # cgroup CPU quota in CPUs (cpu.max), None when unlimited
    total_logical_cpus: int | None = None  # logical CPUs in the machine (os.cpu_count)
    numa_nodes_spanned: int | None = None  # NUMA nodes with CPUs in this process's affinity


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _cgroup_dirs() -> list[Path]:
    """cgroup v2 directories to look in: this process's own cgroup, then the mount root."""
    dirs = []
    text = _read("/proc/self/cgroup") or ""
    for line in text.splitlines():
        if line.startswith("0::"):
            dirs.append(Path("/sys/fs/cgroup") / line[3:].lstrip("/"))
    dirs.append(Path("/sys/fs/cgroup"))
    return dirs


def cgroup_cpu_quota(dirs: list[Path] | None = None) -> float | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max or v1 cfs_quota_us), or None when unlimited/unknown."""
    for d in _cgroup_dirs() if dirs is None else dirs:
        text = _read(d / "cpu.max")
        if text:
            parts = text.split()
            if len(parts) == 2 and parts[0] != "max":
                try:
                    return int(parts[0]) / int(parts[1])
                except (ValueError, ZeroDivisionError):
                    return None
            return None
    quota = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    period = _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    try:
        if quota and period and int(quota) > 0:
            return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        pass
    return None


def cgroup_memory_limit(dirs: list[Path] | None = None) -> int | None:
    """Bytes allowed by the cgroup memory limit (v2 memory.max or v1 limit_in_bytes), or None."""
    for d in _cgroup_dirs() if dirs is None else dirs:
        text = _read(d / "memory.max")
        if text:
            text = text.strip()
            return int(text) if text.isdigit() else None
    text = (_read("/sys/fs/cgroup/memory/memory.limit_in_bytes") or "").strip()
    # v1 reports "unlimited" as a huge page-rounded number.
    if text.isdigit() and int(text) < (1 << 60):
        return int(text)
    return None


def physical_cores(cpus: set[int], sys_cpu: str = "/sys/devices/system/cpu", cpuinfo: str = "/proc/cpuinfo") -> int:
    """Distinct (package, core) pairs among `cpus`; falls back to /proc/cpuinfo, then to len(cpus)."""
    cores = set()
    for cpu in cpus:
        topo = Path(sys_cpu) / f"cpu{cpu}" / "topology"
        core_id = _read(topo / "core_id")
        package_id = _read(topo / "physical_package_id")
        if core_id is None or package_id is None:
            cores = None
            break
        cores.add((package_id.strip(), core_id.strip()))
    if cores:
        return len(cores)
    # /proc/cpuinfo: "processor", "physical id" and "core id" per logical CPU.
    cores = set()
    entry: dict[str, str] = {}
    for line in ((_read(cpuinfo) or "") + "\n\n").splitlines():
        if not line.strip():
            if entry.get("processor", "").isdigit() and int(entry["processor"]) in cpus and "core id" in entry:
                cores.add((entry.get("physical id", "0"), entry["core id"]))
            entry = {}
            continue
        key, _, value = line.partition(":")
        entry[key.strip()] = value.strip()
    return len(cores) if cores else max(1, len(cpus))


def _cpuinfo_field(name: str) -> str | None:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpuinfo_flags() -> set[str]:
    """The first CPU's flags from /proc/cpuinfo (empty when unavailable)."""
    return set((_cpuinfo_field("flags") or "").split())


def _meminfo_bytes(field: str, meminfo: str = "/proc/meminfo") -> int | None:
    """A field of /proc/meminfo (given in kB there) in bytes, or None."""
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def available_memory_bytes(meminfo: str = "/proc/meminfo", dirs: list[Path] | None = None) -> int | None:
    """Bytes this process could allocate now without pushing others out: MemAvailable, capped by what the cgroup
    memory limit leaves (memory.max less memory.current); None when unknown."""
    available = _meminfo_bytes("MemAvailable", meminfo)
    pairs = [(d / "memory.max", d / "memory.current") for d in (_cgroup_dirs() if dirs is None else dirs)]
    if dirs is None:
        v1 = Path("/sys/fs/cgroup/memory")
        pairs.append((v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes"))
    for limit_file, usage_file in pairs:
        limit, used = ((_read(f) or "").strip() for f in (limit_file, usage_file))
        if limit.isdigit() and used.isdigit() and int(limit) < (1 << 60):  # v1 writes "no limit" as a huge number
            left = max(0, int(limit) - int(used))
            available = left if available is None else min(available, left)
            break
    return available


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size of the first CPU's highest-level cache (the L3 on most x86), from sysfs; None when unknown."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best: tuple[int, int] | None = None  # (level, bytes)
    for index in sorted(Path(root).glob("index*")):
        level, size = (_read(index / "level") or "").strip(), (_read(index / "size") or "").strip()
        if not level.isdigit() or not size:
            continue
        digits, unit = (size[:-1], units.get(size[-1])) if size[-1] in units else (size, 1)
        if digits.isdigit() and unit and (best is None or int(level) > best[0]):
            best = (int(level), int(digits) * unit)
    return best[1] if best else None


def numa_nodes(root: str = "/sys/devices/system/node") -> int | None:
    try:
        nodes = [p for p in Path(root).iterdir() if p.name.startswith("node") and p.name[4:].isdigit()]
    except OSError:
        return None
    return len(nodes) or None


def _cpu_list(text: str) -> set[int]:
    """The CPUs of a sysfs list such as "0-3,8,10-11"."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        if first.strip().isdigit() and (not last or last.strip().isdigit()):
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def numa_nodes_spanned(cpus: set[int], root: str = "/sys/devices/system/node") -> int | None:
    """How many NUMA nodes the CPUs `cpus` belong to (nodes of memory only, without CPUs, do not count)."""
    try:
        nodes = [p for p in Path(root).iterdir() if p.name.startswith("node") and p.name[4:].isdigit()]
    except OSError:
        return None
    spanned = sum(1 for node in nodes if _cpu_list(_read(node / "cpulist") or "") & cpus)
    return spanned or None


def _kernel_facts() -> tuple[dict[str, bool], str | None, str]:
    """Features and ISA choice from the native module, or from /proc/cpuinfo flags when it is not built."""
    try:
        from ironlm import _kernels
    except ImportError as e:
        flags = cpuinfo_flags()
        features = {name: flag in flags for name, flag in CPUINFO_FLAGS.items()}
        return features, None, f"ironlm._kernels is not built ({e}); features read from /proc/cpuinfo"
    features = dict(_kernels.cpu_features())
    isa, why = _kernels.active_isa()
    return features, isa, why


def cpu_info() -> CpuInfo:
    """Detect the facts about this machine that matter to ironlm (cheap: reads a few small files)."""
    cpus = _affinity()
    memory = _meminfo_bytes("MemTotal")
    limit = cgroup_memory_limit()
    if limit is not None and (memory is None or limit < memory):
        memory = limit
    features, isa, why = _kernel_facts()
    return CpuInfo(
        model_name=_cpuinfo_field("model name"),
        physical_cores=physical_cores(cpus),
        logical_cpus=len(cpus),
        features=features,
        memory_bytes=memory,
        numa_nodes=numa_nodes(),
        active_isa=isa,
        isa_reason=why,
        cpu_quota=cgroup_cpu_quota(),
        total_logical_cpus=os.cpu_count(),
        numa_nodes_spanned=numa_nodes_spanned(cpus),
    )


def available_cores(info: CpuInfo) -> int:
    """Physical cores this process may keep busy: its affinity, capped by the cgroup CPU quota."""
    cores = info.physical_cores
    if info.cpu_quota is not None:
        cores = min(cores, max(1, math.ceil(info.cpu_quota)))
    return max(1, cores)


def default_threads() -> int:
    """Threads for kernels: IRONLM_THREADS if set, else the physical cores available to this process."""
    env = os.environ.get("IRONLM_THREADS")
    if env is not None and env.strip():
        if not env.strip().isdigit() or int(env) < 1:
            raise IronlmError(f"IRONLM_THREADS={env!r} is not a positive integer; set it to e.g. 4 or unset it")
        return int(env)
    return available_cores(cpu_info())


# What the KV pool may take by default: half of the memory available at load less the model's weights. A fixed 2 GiB
# held 10,900 tokens of a 1.7B model's bf16 K/V (six 1,500-token documents at once) and 4,096 of Llama-2-7B's, one
# full context, so a server of such a model held one long conversation and preempted the rest. The pool's pages are
# mapped lazily, so a large bound costs memory only as sequences fill it (BENCHMARKS.md, session 18).
KV_CACHE_SHARE = 0.5
MIN_KV_CACHE_BYTES = 512 << 20
FALLBACK_KV_CACHE_BYTES = 2 << 30  # where the available memory is unknown


def default_kv_cache_bytes(weight_bytes: int, available: int | None = None, at_least: int = 0) -> int:
    """The KV pool's memory bound when none is given: KV_CACHE_SHARE of (available memory - weight_bytes), raised
    towards `at_least` (the K/V of one context whose length was asked for) as far as that memory allows."""
    available = available_memory_bytes() if available is None else available
    if available is None:
        return max(FALLBACK_KV_CACHE_BYTES, at_least)
    room = available - weight_bytes
    return max(MIN_KV_CACHE_BYTES, int(room * KV_CACHE_SHARE), min(at_least, room))


def default_dtype(info: CpuInfo | None = None) -> str:
    """"bfloat16" where the CPU has native bf16 math (AVX512-BF16 or AMX-BF16), else "float32"."""
    f = (info or cpu_info()).features
    if f.get("avx512_bf16") or (f.get("amx_bf16") and f.get("amx_permitted")):
        return "bfloat16"
    return "float32"
