"""The ISA levels of ironlm's kernels that this CPU and OS can run, lowest first (shared by the kernel tests)."""
from ironlm import _kernels

LEVELS = ["scalar", "avx2", "avx_vnni", "avx512", "avx512_vnni", "avx512_bf16", "amx"]
RUNNABLE = _kernels.supported_isas()
# On levels with AVX512-BF16, bf16 products run on vdpbf16ps or widened to fp32, whichever this CPU runs faster;
# the kernel tests force each way: (level, IRONLM_BF16_DOT mode) pairs.
CASES = [(level, dot) for level in RUNNABLE
         for dot in (("on", "off") if level in ("avx512_bf16", "amx") else ("auto",))]
