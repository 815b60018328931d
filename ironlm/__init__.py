"""ironlm: LLM inference on the CPUs people already own."""
import os

# torch's OpenMP threads spin after each parallel op by default; between our own kernels (which run on their own
# pool) that spinning steals the cores. Passive waiting must be chosen before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ironlm.llm import LLM, GenerationResult  # noqa: E402
from ironlm.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "GenerationResult", "SamplingParams"]
