"""The ISA levels of ironlm's kernels that this CPU and OS can run, lowest first (shared by the kernel tests)."""
from ironlm import _kernels

LEVELS = ["scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"]
RUNNABLE = LEVELS[: LEVELS.index(_kernels.best_isa()) + 1]
