"""The paged KV pool: [layers, 2, num_blocks, kv_heads, block_size, head_dim]. Head-major within a block,
so decode attention reads each kv head's rows of a block as one contiguous run."""
import numpy as np
import torch

from ironlm.models.llama import ModelArgs


def kv_bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return args.num_hidden_layers * 2 * block_size * args.num_key_value_heads * args.head_dim * itemsize


def allocate_kv_pool(args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    # numpy's zeros come from calloc, whose fresh pages the OS maps and zeroes lazily: the pool costs memory only
    # as sequences fill it (torch.zeros writes it all up front). Attention reads only written slots.
    shape = (args.num_hidden_layers, 2, num_blocks, args.num_key_value_heads, block_size, args.head_dim)
    storage = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}[dtype]
    return torch.from_numpy(np.zeros(shape, dtype=storage)).view(dtype)
