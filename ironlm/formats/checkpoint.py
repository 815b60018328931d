"""What every reader produces: a config dict, memory-mapped tensors by HF name, and a tokenizer."""

from __future__ import annotations

import mmap
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

if TYPE_CHECKING:
    from ironlm.tokenizer import Tokenizer

# Storage types whose bytes torch can view directly; BF16 is stored as uint16 and re-viewed.
DENSE_TORCH_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}


@dataclass
class WeightSource:
    """One tensor in a model file, memory-mapped and not yet materialised.

    `data` is the storage view of the mmap: for dense types an array of `shape` (BF16 as uint16), for GGML
    block types a uint8 array (rows, bytes_per_row). `row_order`, when set, gives for each HF row the
    file row holding it (GGUF files permute the rows of llama Q/K projections).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    data: np.ndarray = field(repr=False)
    row_order: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_quantized(self) -> bool:
        return self.dtype not in DENSE_TORCH_DTYPES

    def tensor(self, dtype: torch.dtype) -> torch.Tensor:
        """Dense tensor of `shape` in `dtype`: a zero-copy view of the mmap when `dtype` is the storage type
        and no row reordering is needed, else a new (converted or dequantized) tensor."""
        if self.is_quantized:
            values = dequantize(self.data, GGMLQuantizationType[self.dtype])  # (rows, cols) float32
            t = torch.from_numpy(values).reshape(self.shape)
        else:
            t = torch.from_numpy(self.data)
            if self.dtype == "BF16":
                t = t.view(torch.bfloat16)
            t = t.reshape(self.shape)
        if self.row_order is not None:
            t = t[torch.from_numpy(self.row_order)]
        return t if t.dtype == dtype else t.to(dtype)

    def raw(self) -> np.ndarray:
        """GGML block bytes as uint8 (rows, bytes_per_row), rows in HF order; quantized types only."""
        if not self.is_quantized:
            raise TypeError(f"{self.name} is stored as {self.dtype}, not a GGML block type; use tensor()")
        if self.row_order is None:
            return self.data
        return self.data[self.row_order]  # (rows, bytes_per_row), a copy in HF row order


@dataclass
class Checkpoint:
    """A loaded model file: HF config fields, tensors by HF name, tokenizer and a display name."""

    path: pathlib.Path
    format: str
    config: dict[str, Any]
    tensors: dict[str, WeightSource]
    tokenizer: Tokenizer
    name: str

    def release_pages(self) -> None:
        """Unmap this process's copies of the file's pages; they stay in the page cache and fault back in on the
        next access. Call it once the weights live in memory of their own (packed), or the file counts twice in
        RSS. Never after writing through a tensor view: the copy-on-write mapping would drop the writes."""
        maps = {id(m): m for m in (getattr(s.data, "_mmap", None) for s in self.tensors.values()) if m is not None}
        for m in maps.values():
            m.madvise(mmap.MADV_DONTNEED)
