"""ironlm: LLM inference on the CPUs people already own."""
