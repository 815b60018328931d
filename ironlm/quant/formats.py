"""Weight formats in their plain (unpacked) form: quantize from dense, read GGML blocks, and the
PyTorch reference dequantization every kernel is tested against.

Plain form of a (N, K) weight, K padded with zeros to a multiple of 32 (Kp):
  int8     (Q8_0): qs int8 (N, Kp)             d fp16 (N, Kp/32)             value = d * q
  int4_sym (Q4_0): qs uint8 (N, Kp/32, 16)     d fp16 (N, Kp/32)             value = d * (nibble - 8)
  int4     (Q4_1): qs uint8 (N, Kp/32, 16)     d, m fp16 (N, Kp/32)          value = d * nibble + m
  bf16           : w bf16 (N, Kp)
An int4 byte holds column j of its block in the low nibble and column j + 16 in the high nibble,
exactly as GGML stores it, so GGUF blocks load without requantizing.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
FORMATS = ("int8", "int4", "int4_sym", "bf16")
FORMAT_IDS = {"int8": 0, "int4": 1, "int4_sym": 2, "bf16": 3}  # csrc/kernels.h WeightFormat
GGUF_FORMATS = {"Q8_0": "int8", "Q4_1": "int4", "Q4_0": "int4_sym"}
GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


@dataclass
class PlainWeight:
    """A weight in plain form (see module docstring); `k` is the unpadded number of columns."""

    fmt: str
    n: int
    k: int
    qs: torch.Tensor
    d: torch.Tensor | None = None
    m: torch.Tensor | None = None

    @property
    def k_padded(self) -> int:
        return -(-self.k // BLOCK) * BLOCK


def _pad_k(weight: torch.Tensor) -> torch.Tensor:
    k = weight.shape[1]
    k_padded = -(-k // BLOCK) * BLOCK
    return torch.nn.functional.pad(weight, (0, k_padded - k)) if k_padded != k else weight


def _nibbles_to_bytes(q: torch.Tensor) -> torch.Tensor:
    # (N, Kb, 32) values 0..15 -> (N, Kb, 16) GGML bytes
    return (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)


def _bytes_to_nibbles(qs: torch.Tensor) -> torch.Tensor:
    # (N, Kb, 16) GGML bytes -> (N, Kb, 32) values 0..15
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def quantize(weight: torch.Tensor, fmt: str) -> PlainWeight:
    """Quantize a dense (N, K) weight the way GGML does for Q8_0 / Q4_0 / Q4_1 (bf16: round).

    The plain PyTorch statement of csrc/quantize.cpp, which QuantLinear.from_dense uses."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; use one of {FORMATS}")
    n, k = weight.shape
    w = _pad_k(weight.detach().float())  # (N, Kp)
    if fmt == "bf16":
        return PlainWeight(fmt, n, k, w.to(torch.bfloat16).contiguous())
    blocks = w.reshape(n, -1, BLOCK)  # (N, Kb, 32)
    if fmt == "int8":
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        d = amax / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        scaled = blocks * inv
        q = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).to(torch.int8)  # roundf: ties away from 0
        return PlainWeight(fmt, n, k, q.reshape(n, -1).contiguous(), d.squeeze(-1).half())
    if fmt == "int4_sym":
        # GGML Q4_0: the value of largest magnitude maps to -8.
        idx = blocks.abs().argmax(dim=-1, keepdim=True)
        vmax = blocks.gather(-1, idx)
        d = vmax / -8
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = torch.clamp(torch.trunc(blocks * inv + 8.5), 0, 15).to(torch.uint8)
        return PlainWeight(fmt, n, k, _nibbles_to_bytes(q).contiguous(), d.squeeze(-1).half())
    vmin = blocks.amin(dim=-1, keepdim=True)
    vmax = blocks.amax(dim=-1, keepdim=True)
    d = (vmax - vmin) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc((blocks - vmin) * inv + 0.5), 0, 15).to(torch.uint8)
    return PlainWeight(fmt, n, k, _nibbles_to_bytes(q).contiguous(), d.squeeze(-1).half(), vmin.squeeze(-1).half())


def from_gguf_blocks(raw: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> PlainWeight:
    """GGML Q8_0 / Q4_0 / Q4_1 rows (N, bytes_per_row) to plain form, bit for bit."""
    if ggml_type not in GGUF_BLOCK_BYTES:
        raise ValueError(f"GGML type {ggml_type!r} has no exact ironlm format; use one of {tuple(GGUF_BLOCK_BYTES)}")
    n, k = shape
    block_bytes = GGUF_BLOCK_BYTES[ggml_type]
    if k % BLOCK or raw.shape != (n, k // BLOCK * block_bytes):
        raise ValueError(f"{ggml_type} data of shape {raw.shape} does not fit a ({n}, {k}) weight")
    with warnings.catch_warnings():  # a read-only memmap is fine: it is only read, then repacked
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.uint8)).reshape(n, k // BLOCK, block_bytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)  # (N, Kb)
    if ggml_type == "Q8_0":
        qs = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return PlainWeight("int8", n, k, qs, d)
    if ggml_type == "Q4_0":
        return PlainWeight("int4_sym", n, k, blocks[..., 2:].contiguous(), d)
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    return PlainWeight("int4", n, k, blocks[..., 4:].contiguous(), d, m)


def to_gguf_blocks(plain: PlainWeight) -> np.ndarray:
    """The inverse of from_gguf_blocks (tests use it to prove loading is lossless)."""
    n = plain.n
    d = plain.d.reshape(n, -1, 1).view(torch.uint8)  # (N, Kb, 2)
    if plain.fmt == "int8":
        parts = [d, plain.qs.reshape(n, -1, BLOCK).view(torch.uint8)]
    elif plain.fmt == "int4_sym":
        parts = [d, plain.qs]
    elif plain.fmt == "int4":
        parts = [d, plain.m.reshape(n, -1, 1).view(torch.uint8), plain.qs]
    else:
        raise ValueError("bf16 has no GGML block form")
    return torch.cat(parts, dim=-1).reshape(n, -1).numpy()


def dequantize(plain: PlainWeight) -> torch.Tensor:
    """Reference: the dense float32 (N, K) weight a plain-form weight stands for."""
    n, k = plain.n, plain.k
    if plain.fmt == "bf16":
        return plain.qs.float()[:, :k]
    d = plain.d.float().unsqueeze(-1)  # (N, Kb, 1)
    if plain.fmt == "int8":
        w = plain.qs.reshape(n, -1, BLOCK).float() * d
    elif plain.fmt == "int4_sym":
        w = (_bytes_to_nibbles(plain.qs).float() - 8) * d
    else:
        w = _bytes_to_nibbles(plain.qs).float() * d + plain.m.float().unsqueeze(-1)
    return w.reshape(n, -1)[:, :k]


def reference_linear(x: torch.Tensor, plain: PlainWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for the kernels: dequantize, then a float32 matmul. Returns float32 (T, N)."""
    y = x.float() @ dequantize(plain).t()
    return y + bias.float() if bias is not None else y


def kernel_activations(x: torch.Tensor, fmt: str, bf16_dot: bool) -> torch.Tensor:
    """Reference for what the kernels do to activations (T, K): integer formats round each block of
    32 to int8 with scale amax/127 (round half to even); bf16 weights see bf16 activations on the
    AVX512-BF16 level (`bf16_dot`) and float32 ones elsewhere."""
    x = x.float()
    if fmt == "bf16":
        return x.bfloat16().float() if bf16_dot else x
    t, k = x.shape
    blocks = _pad_k(x).reshape(t, -1, BLOCK)  # (T, Kb, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    return (q * (amax / 127.0)).reshape(t, -1)[:, :k]
