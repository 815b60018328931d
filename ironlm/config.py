"""Engine settings: plain dataclasses, validated, no I/O."""
from dataclasses import dataclass

from ironlm.errors import IronlmError

DTYPES = ("float32", "bfloat16")
QUANTS = ("auto", "none", "int8", "int4", "int4_sym", "bf16")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8")
MAX_PROMPT_LOOKUP = 32  # draft tokens per step: past a few, a step's rows cost more than the drafts kept save


@dataclass
class EngineConfig:
    """How to run a model. `None` fields get a default from the machine or the model at load time."""

    model: str | None = None          # path to a HF directory or a GGUF file; None = embedded default
    dtype: str | None = None          # "float32" | "bfloat16"; None = best for this CPU
    quant: str = "auto"               # linear weights: "auto" (GGUF blocks as stored, else bf16), "none" (torch),
                                      # or a format to quantize to: "int8", "int4", "int4_sym", "bf16"
    threads: int | None = None        # None = physical cores available to this process
    max_model_len: int | None = None  # None = the model's context length
    block_size: int = 16              # tokens per KV block
    num_kv_blocks: int | None = None  # None = enough for max_num_seqs full contexts, capped by kv_cache_bytes
    kv_cache_bytes: int | None = None  # upper bound on KV pool memory when num_kv_blocks is None; None = half
                                       # the memory available at load less the weights (hardware.default_kv_cache_bytes)
    kv_cache_dtype: str = "auto"      # "auto" (bfloat16, or float32 when dtype is "float32"), "float32", "bfloat16",
                                      # or "int8" (a scale per row: half of bf16's memory and bandwidth)
    max_num_seqs: int = 64            # sequences decoding together
    max_num_batched_tokens: int = 512  # tokens per engine step (prefill chunks + decodes)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False       # run every step from Python; False replays decode steps as kernel graphs
    prompt_lookup: int = 4            # most draft tokens per decode step taken from the sequence's own text (0: none)
    chat_template: str | None = None  # Jinja text that replaces the model's own chat template

    def validate(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise IronlmError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.quant not in QUANTS:
            raise IronlmError(f"quant {self.quant!r} is not supported; use one of {', '.join(QUANTS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise IronlmError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; use one of {', '.join(KV_CACHE_DTYPES)}")
        for name in ("threads", "max_model_len", "num_kv_blocks", "kv_cache_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise IronlmError(f"{name} must be a positive integer, got {value!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise IronlmError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.prompt_lookup, int) or not 0 <= self.prompt_lookup <= MAX_PROMPT_LOOKUP:
            raise IronlmError(f"prompt_lookup must be an integer from 0 to {MAX_PROMPT_LOOKUP}, got "
                              f"{self.prompt_lookup!r}")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise IronlmError("chat_template must be the template's Jinja text (a string)")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise IronlmError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode each step"
            )


def kv_cache_dtype_for(kv_cache_dtype: str, dtype: str | None) -> str:
    """What a kv_cache_dtype setting resolves to. "auto" is bfloat16: half the memory and bandwidth of float32 rows,
    and what bf16 models keep anyway. float32 only when float32 compute is asked for by name (the reference path),
    not where the CPU merely lacks bf16 math and the compute dtype defaults to float32."""
    if kv_cache_dtype != "auto":
        return kv_cache_dtype
    return "float32" if dtype == "float32" else "bfloat16"
