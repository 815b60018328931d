"""The paged KV pool: [layers, 2, num_blocks, kv_heads, block_size, head_dim]. Head-major within a block,
so decode attention reads each kv head's rows of a block as one contiguous run. An int8 pool keeps a float
scale per row beside it: [layers, 2, num_blocks, kv_heads, block_size]."""
import math
import mmap

import torch

from ironlm.models.llama import ModelArgs


def kv_bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    row_bytes = args.head_dim * dtype.itemsize + (4 if dtype is torch.int8 else 0)  # an int8 row has a float scale
    return args.num_hidden_layers * 2 * block_size * args.num_key_value_heads * row_bytes


def allocate_kv_pool(args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    # An anonymous mapping: the OS maps and zeroes its pages lazily, so the pool costs memory only as sequences
    # fill it (torch.zeros writes it all up front). Attention reads only written slots. Not numpy's zeros: numpy
    # asks for transparent huge pages on large arrays, and where the kernel then compacts memory to find one, a
    # KV write that first touched a 2 MB page could stall for milliseconds (1.7B shape, 16 sequences: KV writes
    # 7.6 ms a step instead of 2.4, `benchmarks/profile_decode.py --batch 16`).
    shape = (args.num_hidden_layers, 2, num_blocks, args.num_key_value_heads, block_size, args.head_dim)
    return _lazy_zeros(shape, dtype)


def allocate_kv_scales(args: ModelArgs, num_blocks: int, block_size: int) -> torch.Tensor:
    """The scales of an int8 pool, one float per row: [layers, 2, num_blocks, kv_heads, block_size]."""
    return _lazy_zeros((args.num_hidden_layers, 2, num_blocks, args.num_key_value_heads, block_size), torch.float32)


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    pages = mmap.mmap(-1, math.prod(shape) * dtype.itemsize)  # the tensor keeps the mapping alive
    return torch.frombuffer(pages, dtype=dtype).view(shape)
