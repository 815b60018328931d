"""QuantLinear: a drop-in for torch.nn.Linear whose weight is packed for ironlm's own kernels."""

import numpy as np
import torch
from torch import nn

from ironlm import _kernels
from ironlm.quant import formats
from ironlm.quant.formats import FORMAT_IDS, FORMATS, GGUF_FORMATS, PlainWeight
from ironlm.quant.pack import pack, unpack


# Packed bytes per (16-row tile, block of 32 columns); csrc/kernels.h tile_block_bytes.
_UNIT_BYTES = {"int8": 8 * 64 + 32, "int4_sym": 4 * 64 + 32, "int4": 4 * 64 + 64, "bf16": 16 * 64}


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W (N, K) in one of FORMATS, packed once at construction.

    forward takes x (..., K) float32 or bfloat16 and returns (..., N) in x's dtype.
    """

    def __init__(self, packed: torch.Tensor, fmt: str, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; use one of {FORMATS}")
        self.fmt = fmt
        self._fmt_id = FORMAT_IDS[fmt]
        self.in_features = in_features
        self.out_features = out_features
        self.k_padded = -(-in_features // formats.BLOCK) * formats.BLOCK
        expected = -(-out_features // 16) * (self.k_padded // formats.BLOCK) * _UNIT_BYTES[fmt]
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected or not packed.is_contiguous():
            raise ValueError(f"packed {fmt} weight for ({out_features}, {in_features}) must be {expected} contiguous uint8 bytes")
        self.register_buffer("packed", packed)
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias {tuple(bias.shape)} must be ({out_features},)")
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.conversion_error: float | None = None  # relative RMS error added by a lossy conversion

    @classmethod
    def from_plain(cls, plain: PlainWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Pack a plain-form weight (ironlm.quant.formats)."""
        return cls(pack(plain), plain.fmt, plain.k, plain.n, bias)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> "QuantLinear":
        """Quantize a dense HF-shaped (N, K) weight into `fmt` (GGML's rounding for the integer formats)."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; use one of {FORMATS}")
        if fmt == "bf16":
            return cls.from_plain(formats.quantize(weight, fmt), bias)
        n, k = weight.shape
        w = weight.detach()
        if w.dtype not in (torch.float32, torch.bfloat16):
            w = w.float()
        if w.stride(1) != 1 or (n > 1 and w.stride(0) < k):
            w = w.contiguous()
        k_padded = -(-k // formats.BLOCK) * formats.BLOCK
        packed = torch.zeros(-(-n // 16) * (k_padded // formats.BLOCK) * _UNIT_BYTES[fmt], dtype=torch.uint8)
        _kernels.quantize_pack(FORMAT_IDS[fmt], w.data_ptr(), w.stride(0) if n > 1 else k, w.dtype is torch.bfloat16,
                               n, k, packed.data_ptr())
        return cls(packed, fmt, k, n, bias)

    @classmethod
    def from_gguf(cls, raw: np.ndarray, ggml_type: str, shape: tuple[int, int],
                  bias: torch.Tensor | None = None) -> "QuantLinear":
        """GGML blocks (N, bytes_per_row): Q8_0/Q4_0/Q4_1 load bit-exactly; K-quants are converted
        (see ironlm.quant.kquants) and the added error is kept in `conversion_error`."""
        if ggml_type in GGUF_FORMATS:
            return cls(_repack_gguf(raw, ggml_type, shape), GGUF_FORMATS[ggml_type], shape[1], shape[0], bias)
        from ironlm.quant.kquants import convert_kquant

        plain, error = convert_kquant(raw, ggml_type, shape)
        layer = cls.from_plain(plain, bias)
        layer.conversion_error = error
        return layer

    @property
    def nbytes(self) -> int:
        """Bytes of packed weight read per forward (scales included, bias excluded)."""
        return self.packed.numel()

    @property
    def kernel(self) -> str:
        """The kernel this layer runs on the current ISA level."""
        return _kernels.gemm_kernel_name(FORMAT_IDS[self.fmt])

    def plain(self) -> PlainWeight:
        """The weight in plain form, unpacked from the tiles."""
        return unpack(self.packed, self.fmt, self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """Dense float32 (N, K) weight (reference path and tests)."""
        return formats.dequantize(self.plain())

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """out_dtype: float32 or bfloat16 (default x's dtype); the kernel writes it directly."""
        # Each tensor attribute read costs a fraction of a microsecond and this runs hundreds of times a token on
        # small models, so x's dtype and shape are read once.
        k, n = self.in_features, self.out_features
        dtype = x.dtype
        if dtype is not torch.bfloat16 and dtype is not torch.float32:
            x, dtype = x.float(), torch.float32
        shape = x.shape
        if shape[-1] != k:
            raise ValueError(f"QuantLinear expects {k} input features, got shape {tuple(shape)}")
        flat = len(shape) == 2
        x2 = x if flat else x.reshape(-1, k)  # (T, K)
        t = shape[0] if flat else x2.shape[0]
        row_stride, col_stride = x2.stride()
        if col_stride != 1 or (t > 1 and row_stride < k):
            x2 = x2.contiguous()
            row_stride = k
        if out_dtype is not None and out_dtype is not torch.bfloat16 and out_dtype is not torch.float32:
            raise ValueError(f"QuantLinear writes float32 or bfloat16, not {out_dtype}")
        y_dtype = out_dtype or dtype
        y = torch.empty(t, n, dtype=y_dtype)  # (T, N); sizes as arguments: a tuple is parsed more slowly
        # _buffers directly: nn.Module attribute lookup costs ~1 us, and forward runs hundreds of
        # times per token on small models.
        buffers = self._buffers
        bias = buffers["bias"]
        _kernels.gemm(self._fmt_id, buffers["packed"].data_ptr(), n, self.k_padded, t, k, x2.data_ptr(),
                      row_stride if t > 1 else k, dtype is torch.bfloat16, y.data_ptr(), n,
                      y_dtype is torch.bfloat16, 0 if bias is None else bias.data_ptr())
        return y if flat else y.reshape(*shape[:-1], n)

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        # Straight to forward: nn.Module's hook dispatch costs ~1 us a call, a decode step of a small model
        # makes over a hundred of these calls, and ironlm registers no hooks (as ironlm.layers.module.Module).
        return self.forward(x, out_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, bias={self.bias is not None}"


def _repack_gguf(raw: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> torch.Tensor:
    """GGML rows -> packed tiles in one C++ pass (the same bytes pack(from_gguf_blocks(...)) makes)."""
    n, k = shape
    block_bytes = formats.GGUF_BLOCK_BYTES[ggml_type]
    if k % formats.BLOCK or raw.shape != (n, k // formats.BLOCK * block_bytes) or raw.dtype != np.uint8:
        raise ValueError(f"{ggml_type} data of shape {raw.shape} does not fit a ({n}, {k}) weight")
    fmt = GGUF_FORMATS[ggml_type]
    src = np.ascontiguousarray(raw)
    packed = torch.zeros(-(-n // 16) * (k // formats.BLOCK) * _UNIT_BYTES[fmt], dtype=torch.uint8)
    _kernels.repack_ggml(FORMAT_IDS[fmt], src.ctypes.data, src.strides[0], n, k, packed.data_ptr())
    return packed


def bf16_rounds_activations(rows: int = 1 << 20) -> bool:
    """Whether the bf16 GEMM of the current ISA level rounds `rows` rows of activations to bf16: vdpbf16ps where
    the CPU runs it fast enough (else bf16 weights are widened to fp32, as below AVX512-BF16), and AMX tiles from
    32 rows. The default, many rows, answers whether any call may round."""
    return _kernels.bf16_gemm_rounds(rows)


def kernel_report() -> dict[str, str]:
    """Which kernel each weight format runs on the current ISA level (for `ironlm info`)."""
    return {fmt: _kernels.gemm_kernel_name(FORMAT_IDS[fmt]) for fmt in FORMATS}


def quantize_model(model: nn.Module, fmt: str, skip: set[str] = frozenset()) -> nn.Module:
    """Swap every nn.Linear in `model` for a QuantLinear in `fmt`, in place (lm_head included).

    `skip` holds module names to leave dense, matched against the full dotted name or its last part.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; use one of {FORMATS}")
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and full not in skip and child_name not in skip:
                targets.append((module, child_name, child))
    for parent, child_name, child in targets:
        setattr(parent, child_name, QuantLinear.from_dense(child.weight, child.bias, fmt))
    return model
