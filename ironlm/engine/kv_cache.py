"""The paged KV pool: [layers, 2, num_blocks, block_size, kv_heads, head_dim]."""
import torch

from ironlm.models.llama import ModelArgs


def kv_bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return args.num_hidden_layers * 2 * block_size * args.num_key_value_heads * args.head_dim * itemsize


def allocate_kv_pool(args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    # Zeroed: decode attention pads short contexts with unwritten slots, and garbage there could be NaN,
    # which survives a zero attention weight (0 * NaN = NaN).
    return torch.zeros(
        (args.num_hidden_layers, 2, num_blocks, block_size, args.num_key_value_heads, args.head_dim), dtype=dtype
    )
