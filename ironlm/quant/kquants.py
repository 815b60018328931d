"""GGUF K-quants (Q4_K, Q5_K, Q6_K) converted to the nearest ironlm format, with the error the
conversion adds measured against the K-quant's own dequantized values."""

import gguf
import numpy as np
import torch
from gguf import quants as gguf_quants

from ironlm.quant.formats import PlainWeight, _nibbles_to_bytes, dequantize, quantize

# Q4_K's 4-bit codes fit int4 blocks; 5- and 6-bit codes need int8 to stay close.
KQUANT_TARGETS = {"Q4_K": "int4", "Q5_K": "int8", "Q6_K": "int8"}


def convert_kquant(raw: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> tuple[PlainWeight, float]:
    """K-quant rows (N, bytes_per_row) -> (plain weight, relative RMS error added by the conversion)."""
    if ggml_type not in KQUANT_TARGETS:
        raise ValueError(f"GGML type {ggml_type!r} is not supported; use Q4_0, Q4_1, Q8_0, Q4_K, Q5_K or Q6_K")
    raw = np.asarray(raw, dtype=np.uint8)
    dense = torch.from_numpy(gguf_quants.dequantize(raw, gguf.GGMLQuantizationType[ggml_type])).reshape(shape)
    plain = _q4_k_to_int4(raw, shape) if ggml_type == "Q4_K" else quantize(dense, KQUANT_TARGETS[ggml_type])
    error = ((dequantize(plain) - dense).norm() / dense.norm().clamp_min(1e-30)).item()
    return plain, error


def _q4_k_to_int4(raw: np.ndarray, shape: tuple[int, int]) -> PlainWeight:
    """Each 32-value sub-block of Q4_K is d*sc*q - dmin*m with 4-bit q: an int4 (Q4_1) block with
    the same codes, scale fp16(d*sc) and minimum fp16(-dmin*m). Only those two roundings add error."""
    n, k = shape
    blocks = raw.reshape(n, k // 256, 144)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # (N, S, 1)
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc = blocks[..., 4:16].astype(np.int32)  # (N, S, 12) packed 6-bit scales and mins
    lo_scale, lo_min = sc[..., 0:4] & 63, sc[..., 4:8] & 63
    hi_scale = (sc[..., 8:12] & 0x0F) | ((sc[..., 0:4] >> 6) << 4)
    hi_min = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    scales = np.concatenate([lo_scale, hi_scale], axis=-1)  # (N, S, 8) for sub-blocks 0..7
    mins = np.concatenate([lo_min, hi_min], axis=-1)
    qs = blocks[..., 16:].reshape(n, k // 256, 4, 32)  # 4 pairs of sub-blocks share 32 bytes
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k // 32, 32)  # sub-block 2j: low, 2j+1: high
    d_sub = torch.from_numpy((d * scales).reshape(n, -1)).half()
    m_sub = torch.from_numpy((-dmin * mins).reshape(n, -1)).half()
    return PlainWeight("int4", n, k, _nibbles_to_bytes(torch.from_numpy(codes.astype(np.uint8))).contiguous(), d_sub, m_sub)
