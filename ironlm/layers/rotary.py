"""Rotary position embeddings (Hugging Face rotate_half layout) with the scalings Llama-family models use."""
import math

import torch

from ironlm import kernels
from ironlm.errors import ModelLoadError
from ironlm.layers.module import Module

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "llama3_freqs")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None,
                        freq_factors: torch.Tensor | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))  # (D/2,)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / factor,
                               torch.where(wavelen < high_wavelen, inv_freq, smoothed))
    elif rope_type == "llama3_freqs":
        # GGUF files carry llama3 scaling as per-frequency divisors instead of config fields.
        if freq_factors is None:
            raise ModelLoadError("rope_scaling llama3_freqs needs the rope_freqs tensor, which the file lacks")
        inv_freq = inv_freq / freq_factors.double()
    return inv_freq.float()


class RotaryEmbedding(Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None,
                 freq_factors: torch.Tensor | None = None):
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling, freq_factors)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)  # (P, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)  # (P, D/2)
        self.register_buffer("sin", angles.sin(), persistent=False)  # (P, D/2)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (T,); q: (T, H, D); k: (T, KVH, D), rotated in place (rotate_half layout)
        kernels.apply_rope(q, k, positions, self.cos, self.sin)
        return q, k
