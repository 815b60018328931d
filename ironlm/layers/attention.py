"""Attention over the paged KV cache. The step's layout comes in as AttentionMetadata, never as layer state."""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ironlm import kernels
from ironlm.layers.module import Module


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit. Sequence i owns query rows [query_starts[i], query_starts[i] + query_lens[i])."""

    slot_mapping: torch.Tensor       # (T,) int64: flat KV slot (block * block_size + offset) of each new token
    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]          # tokens in the cache for each sequence once this step is written
    block_tables: torch.Tensor       # (B, max_blocks) int32, padded with 0
    context_lens_tensor: torch.Tensor  # (B,) int32
    # Decided once per step, read by every layer: which sequences have a single query token (decodes, or a
    # prompt's last one-token chunk). Those run on the paged decode kernel even when others are prefilling.
    decode_only: bool = field(init=False)
    single: list[bool] = field(init=False)
    single_rows: torch.Tensor | None = field(init=False)    # (S,) query rows of the single-token sequences
    single_tables: torch.Tensor | None = field(init=False)  # (S, max_blocks) int32
    single_lens: torch.Tensor | None = field(init=False)    # (S,) int32

    def __post_init__(self):
        self.single = [n == 1 for n in self.query_lens]
        self.decode_only = all(self.single)
        self.single_rows = self.single_tables = self.single_lens = None
        if any(self.single) and not self.decode_only:
            seqs = torch.tensor([i for i, one in enumerate(self.single) if one])
            self.single_rows = torch.tensor([self.query_starts[i] for i, one in enumerate(self.single) if one])
            self.single_tables = self.block_tables.index_select(0, seqs).contiguous()
            self.single_lens = self.context_lens_tensor.index_select(0, seqs).contiguous()


class PagedAttention(Module):
    """Writes K/V into the paged pool, then attends each query to its sequence's whole context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        # this layer's views into the engine's KV pool, bound once by the model runner
        self.cache: kernels.PagedCache | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: (T, H, D); k, v: (T, KVH, D) -> (T, H, D)
        kernels.write_kv(k, v, self.cache, meta.slot_mapping)
        if meta.decode_only and self.sliding_window is None:
            return self._decode(q, meta)
        out = torch.empty_like(q)
        fast = self.sliding_window is None and meta.single_rows is not None
        if fast:  # the step's decodes, in one kernel call
            out[meta.single_rows] = kernels.paged_attention_decode(
                q.index_select(0, meta.single_rows), self.cache, meta.single_tables, meta.single_lens, self.scale)
        for i, (start, length, context) in enumerate(zip(meta.query_starts, meta.query_lens, meta.context_lens)):
            if fast and meta.single[i]:
                continue
            q_seq = q[start:start + length]
            if self.sliding_window is not None:
                if context == length:
                    k_seq, v_seq = k[start:start + length], v[start:start + length]
                else:
                    k_seq, v_seq = self._gather(meta.block_tables[i], context)
                out[start:start + length] = self._attend_window(q_seq, k_seq.to(q.dtype), v_seq.to(q.dtype), context)
            elif context == length:  # nothing cached before this step: the fresh K/V directly (unrounded)
                out[start:start + length] = kernels.prefill_attention(
                    q_seq, k[start:start + length], v[start:start + length], self.scale)
            else:  # a later chunk reads its context from the cache, int8 rows dequantized on the way
                out[start:start + length] = kernels.prefill_attention_paged(
                    q_seq, self.cache, meta.block_tables[i], context, self.scale)
        return out

    def _gather(self, block_table: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's first `context` cached K and V rows: (C, KVH, D) each; int8 rows come back as float32."""
        cache = self.cache
        blocks = block_table[:-(-context // cache.block_size)]
        k, v = cache.k.index_select(0, blocks), cache.v.index_select(0, blocks)  # (N, KVH, bs, D)
        if cache.k_scale is not None:
            k = kernels.dequantize_kv(k, cache.k_scale.index_select(0, blocks))
            v = kernels.dequantize_kv(v, cache.v_scale.index_select(0, blocks))
        return k.transpose(1, 2).flatten(0, 1)[:context], v.transpose(1, 2).flatten(0, 1)[:context]

    def _attend_window(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int) -> torch.Tensor:
        """Causal attention within the sliding window, through PyTorch's SDPA and a mask."""
        # q: (L, H, D); k, v: (C, KVH, D); query i sits at position context - L + i
        length = q.shape[0]
        q_pos = torch.arange(context - length, context).unsqueeze(1)  # (L, 1)
        k_pos = torch.arange(context).unsqueeze(0)  # (1, C)
        mask = (k_pos <= q_pos) & (k_pos > q_pos - self.sliding_window)
        # 4-D (batch of one): PyTorch's CPU flash kernel takes only 4-D inputs; 3-D falls back to a path ~3x slower.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, scale=self.scale, enable_gqa=True,
        )[0]  # (H, L, D)
        return out.transpose(0, 1)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: (B, H, D), one new token per sequence, its K/V already in the cache
        return kernels.paged_attention_decode(q, self.cache, meta.block_tables, meta.context_lens_tensor, self.scale)
