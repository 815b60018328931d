"""ironlm: LLM inference on the CPUs people already own."""
from ironlm.llm import LLM, GenerationResult
from ironlm.sampling import SamplingParams

__all__ = ["LLM", "GenerationResult", "SamplingParams"]
