"""ironlm's fused CPU ops and paged decode attention (csrc/ops_impl.h), and the plain PyTorch
reference each one is tested against. Inputs are float32 or bfloat16; outputs take x's dtype."""

import torch

from ironlm import _kernels


_FLOAT_TYPES = (torch.float32, torch.bfloat16)
_KV_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # csrc/ops.h DType


def set_num_threads(n: int) -> None:
    """Size the kernels' thread pool (default: online CPUs; use the physical core count)."""
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    _kernels.set_num_threads(n)


def num_threads() -> int:
    return _kernels.num_threads()


def isa() -> tuple[str, str]:
    """(level, reason): the ISA level the kernels use and why (IRONLM_ISA, CPU, OS)."""
    return _kernels.active_isa()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, as Hugging Face Llama computes it. A (T, H, D) view with evenly spaced heads
    within each token (the query heads of a fused qkv output) is read in place, not copied first."""
    shape, strides = x.shape, x.stride()
    if len(shape) == 3 and strides[2] == 1 and x.dtype in _FLOAT_TYPES and not x.is_contiguous() \
            and strides[1] >= shape[2] and (shape[0] == 1 or strides[0] >= shape[1] * strides[1]):
        x2, group, group_stride = x, shape[1], strides[0]  # rows are heads, H of them a token
        rows, dim, row_stride = shape[0] * shape[1], shape[2], strides[1]
    else:
        x2 = _rows(x, "x")  # (T, D): dense, or gaps between rows
        (rows, dim), row_stride = x2.shape, _row_stride(x2)
        group, group_stride = max(rows, 1), 0  # one group: a plain matrix
    out = torch.empty(rows, dim, dtype=x2.dtype)
    w = _vector(weight, dim, "weight")
    bf16 = x2.dtype is torch.bfloat16
    _kernels.rms_norm(rows, dim, x2.data_ptr(), row_stride, group, group_stride, bf16, 0, 0, False, w.data_ptr(),
                      w.dtype is torch.bfloat16, out.data_ptr(), dim, bf16, eps)
    return out if len(shape) == 2 else out.view(shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 in_place: bool = False) -> torch.Tensor:
    """residual += x (in place), then return RMSNorm(residual) in x's dtype. in_place: written over x (a layer's
    output that nothing reads again), which saves allocating the result."""
    x2 = _rows(x, "x")  # (T, D)
    rows, dim = x2.shape
    r2 = residual if residual.dim() == 2 else residual.view(-1, residual.shape[-1])
    if r2.shape != x2.shape or r2.dtype not in _FLOAT_TYPES or r2.stride(-1) != 1:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x and have contiguous rows")
    out = x2 if in_place else torch.empty(rows, dim, dtype=x2.dtype)  # x2: x, a view of it, or a copy
    w = _vector(weight, dim, "weight")
    bf16 = x2.dtype is torch.bfloat16
    # Each row is read whole (into the residual) before its output is written, so out may be x2.
    _kernels.rms_norm(rows, dim, x2.data_ptr(), _row_stride(x2), max(rows, 1), 0, bf16, r2.data_ptr(), _row_stride(r2),
                      r2.dtype is torch.bfloat16, w.data_ptr(), w.dtype is torch.bfloat16, out.data_ptr(),
                      _row_stride(out), bf16, eps)
    return out if x2 is x else out.reshape(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(T, 2I) -> (T, I): silu(gate) * up with gate_up = [gate | up]."""
    g2 = _rows(gate_up, "gate_up")
    rows, width = g2.shape
    inter = width // 2
    if width % 2:
        raise ValueError(f"silu_mul: last dim {width} of gate_up must be even")
    out = torch.empty(rows, inter, dtype=g2.dtype)
    bf16 = g2.dtype is torch.bfloat16
    _kernels.silu_mul(rows, inter, g2.data_ptr(), _row_stride(g2), bf16, out.data_ptr(), inter, bf16)
    return out if g2 is gate_up else out.reshape(*gate_up.shape[:-1], inter)


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin caches (max_positions, rot_dim / 2) float32 for apply_rope."""
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Neox-style (rotate_half) rotary embedding, in place on q (T, H, D) and k (T, KVH, D).

    cos/sin are float32 (max_positions, rot_dim / 2); only the first rot_dim of D rotate.
    q and k may be strided views (e.g. of a fused qkv output) as long as D is contiguous."""
    # Shapes and strides fetched once: each tensor attribute costs a fraction of a microsecond, and this runs
    # once a layer per step.
    q_shape, k_shape, q_strides, k_strides, cos_shape = q.shape, k.shape, q.stride(), k.stride(), cos.shape
    if len(q_shape) != 3 or len(k_shape) != 3 or q_strides[2] != 1 or k_strides[2] != 1 or q_shape[0] != k_shape[0] \
            or q_shape[2] != k_shape[2] or q.dtype not in _FLOAT_TYPES or k.dtype not in _FLOAT_TYPES:
        raise ValueError(f"apply_rope: q {tuple(q_shape)} and k {tuple(k_shape)} must be (T, heads, D) float32/bfloat16 with contiguous D")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos_shape != sin.shape or len(cos_shape) != 2 \
            or not cos.is_contiguous() or not sin.is_contiguous() or 2 * cos_shape[1] > q_shape[2]:
        raise ValueError(f"apply_rope: cos/sin {tuple(cos_shape)} must be contiguous float32 (max_positions, rot_dim / 2)")
    pos = _int64(positions)
    if pos.shape != (q_shape[0],):
        raise ValueError(f"apply_rope: positions {tuple(positions.shape)} must be ({q_shape[0]},)")
    _kernels.rope(q_shape[0], q_shape[2], 2 * cos_shape[1], q.data_ptr(), q_shape[1], q_strides[0], q_strides[1],
                  q.dtype is torch.bfloat16, k.data_ptr(), k_shape[1], k_strides[0], k_strides[1], k.dtype is torch.bfloat16,
                  pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos_shape[0])


class PagedCache:
    """One layer's paged K and V pools (num_blocks, KVH, block_size, D), contiguous, bf16, float32 or int8 (e.g.
    pool[layer, 0] and pool[layer, 1]); an int8 pool comes with float32 row scales (num_blocks, KVH, block_size).
    Checked once here, so the per-token kernels below check only what changes from call to call."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None):
        if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype or k.dtype not in _KV_TYPES \
                or not k.is_contiguous() or not v.is_contiguous():
            raise ValueError(f"paged cache: K {tuple(k.shape)} {k.dtype} and V {tuple(v.shape)} {v.dtype} must be "
                             "contiguous (blocks, KVH, block_size, D) of one dtype: float32, bfloat16 or int8")
        if k.dtype is torch.int8:
            for scale in (k_scale, v_scale):
                if scale is None or scale.dtype != torch.float32 or scale.shape != k.shape[:3] or not scale.is_contiguous():
                    raise ValueError(f"paged cache: an int8 cache needs contiguous float32 K and V scales of shape {tuple(k.shape[:3])}")
        elif k_scale is not None or v_scale is not None:
            raise ValueError("paged cache: scales go only with an int8 cache")
        self.k, self.v, self.k_scale, self.v_scale = k, v, k_scale, v_scale
        self.num_blocks, self.kv_heads, self.block_size, self.head_dim = k.shape
        # (dtype id, K, V, K scales, V scales) as the kernels take them; the tensors above keep them alive
        self.pointers = (_KV_TYPES[k.dtype], k.data_ptr(), v.data_ptr(),
                         0 if k_scale is None else k_scale.data_ptr(), 0 if v_scale is None else v_scale.data_ptr())


def paged_attention_decode(q: torch.Tensor, cache: PagedCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One new token per sequence attends to its cached tokens. q (B, H, D); block_tables (B, max_blocks) int32;
    context_lens (B,) int32 counting the new token, whose K/V are already written. Returns (B, H, D) in q's dtype."""
    q_shape, q_strides, table_shape = q.shape, q.stride(), block_tables.shape
    if len(q_shape) != 3 or q_strides[2] != 1 or q.dtype not in _FLOAT_TYPES or q_shape[2] != cache.head_dim \
            or q_shape[1] % cache.kv_heads:
        raise ValueError(f"paged_attention_decode: q {tuple(q_shape)} {q.dtype} must be (B, H, {cache.head_dim}) "
                         f"float32/bfloat16 with H a multiple of the cache's {cache.kv_heads} kv heads")
    batch, heads, head_dim = q_shape
    if block_tables.dtype != torch.int32 or len(table_shape) != 2 or table_shape[0] != batch \
            or not block_tables.is_contiguous():
        raise ValueError("paged_attention_decode: block_tables must be contiguous int32 (B, max_blocks)")
    if context_lens.dtype != torch.int32 or context_lens.shape != (batch,) or not context_lens.is_contiguous():
        raise ValueError("paged_attention_decode: context_lens must be contiguous int32 (B,)")
    bf16 = q.dtype is torch.bfloat16
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype)
    dtype, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr = cache.pointers
    _kernels.paged_attention_decode(batch, heads, cache.kv_heads, head_dim, cache.block_size, table_shape[1],
                                    cache.num_blocks, q.data_ptr(), bf16, q_strides[0], q_strides[1], k_ptr, v_ptr,
                                    dtype, k_scale_ptr, v_scale_ptr, block_tables.data_ptr(), context_lens.data_ptr(),
                                    float(scale), out.data_ptr(), bf16)
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of L new tokens over a context of C tokens, the new ones last: q (L, H, D), k and v
    (C, KVH, D), float32/bfloat16 with contiguous D (strided views of a fused qkv output are fine); query i sits
    at position C - L + i and sees keys 0..C - L + i. Returns (L, H, D) in q's dtype."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[2] != k.shape[2] or q.stride(2) != 1 \
            or k.stride(2) != 1 or v.stride(2) != 1 or any(t.dtype not in _FLOAT_TYPES for t in (q, k, v)):
        raise ValueError(f"prefill_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "(L, H, D) and (C, KVH, D) float32/bfloat16 with contiguous D")
    out = torch.empty(q.shape, dtype=q.dtype)
    if q.shape[0] == 0:
        return out
    _kernels.prefill_attention(q.shape[0], k.shape[0], q.shape[1], k.shape[1], q.shape[2], q.data_ptr(), q.stride(0),
                               q.stride(1), q.dtype is torch.bfloat16, k.data_ptr(), k.stride(0), k.stride(1),
                               k.dtype is torch.bfloat16, v.data_ptr(), v.stride(0), v.stride(1),
                               v.dtype is torch.bfloat16, float(scale), out.data_ptr(), out.dtype is torch.bfloat16)
    return out


def prefill_attention_paged(q: torch.Tensor, cache: PagedCache, block_table: torch.Tensor, context: int,
                            scale: float) -> torch.Tensor:
    """prefill_attention over a sequence's first `context` tokens in a paged cache, the L new ones (already
    written) last: q (L, H, D); block_table (>= context / block_size,) int32, the sequence's blocks. int8 rows
    are dequantized as they are read, so nothing is gathered. Returns (L, H, D) in q's dtype."""
    if q.dim() != 3 or q.stride(2) != 1 or q.dtype not in _FLOAT_TYPES or q.shape[2] != cache.head_dim \
            or q.shape[1] % cache.kv_heads:
        raise ValueError(f"prefill_attention_paged: q {tuple(q.shape)} {q.dtype} must be (L, H, {cache.head_dim}) "
                         f"float32/bfloat16 with H a multiple of the cache's {cache.kv_heads} kv heads")
    if block_table.dtype != torch.int32 or block_table.dim() != 1 or not block_table.is_contiguous():
        raise ValueError("prefill_attention_paged: block_table must be a contiguous int32 vector")
    out = torch.empty(q.shape, dtype=q.dtype)
    if q.shape[0] == 0:
        return out
    dtype, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr = cache.pointers
    _kernels.prefill_attention_paged(q.shape[0], int(context), q.shape[1], cache.kv_heads, cache.head_dim,
                                     q.data_ptr(), q.stride(0), q.stride(1), q.dtype is torch.bfloat16,
                                     cache.block_size, cache.num_blocks, k_ptr, v_ptr, dtype, k_scale_ptr, v_scale_ptr,
                                     block_table.data_ptr(), block_table.shape[0], float(scale), out.data_ptr(),
                                     out.dtype is torch.bfloat16)
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, cache: PagedCache, slots: torch.Tensor) -> None:
    """Store new tokens' k, v (T, KVH, D), float32/bfloat16 with contiguous D, at flat slots (T,)
    (block * block_size + offset) of the cache, converting to its dtype. An int8 cache stores each row as
    round(x * 127 / max|x|) and max|x| / 127 in its scales."""
    k_shape, k_strides, v_strides = k.shape, k.stride(), v.stride()
    if len(k_shape) != 3 or k_shape != v.shape or k_strides[2] != 1 or v_strides[2] != 1 \
            or k.dtype not in _FLOAT_TYPES or v.dtype not in _FLOAT_TYPES \
            or k_shape[1] != cache.kv_heads or k_shape[2] != cache.head_dim:
        raise ValueError(f"write_kv: k {tuple(k_shape)} and v {tuple(v.shape)} must be (T, {cache.kv_heads}, "
                         f"{cache.head_dim}) float32/bfloat16 with contiguous D, as the cache")
    slots = _int64(slots)
    if slots.shape != (k_shape[0],):
        raise ValueError(f"write_kv: slots {tuple(slots.shape)} must be ({k_shape[0]},)")
    dtype, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr = cache.pointers
    _kernels.kv_write(k_shape[0], cache.kv_heads, cache.head_dim, cache.block_size, cache.num_blocks, k.data_ptr(),
                      k_strides[0], k_strides[1], k.dtype is torch.bfloat16, v.data_ptr(), v_strides[0], v_strides[1],
                      v.dtype is torch.bfloat16, k_ptr, v_ptr, dtype, k_scale_ptr, v_scale_ptr, slots.data_ptr())


def sample(weights: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, u: torch.Tensor) -> list[int]:
    """One token id per row of logits (S, V) float32 with contiguous rows. Per row (S,): temperature (> 0), top_k
    (int, 0 for none), top_p, min_p, and u (float64 in [0, 1)) where the draw lands. Each row of logits is left
    holding the weights it was drawn from, reference_sample_weights; csrc/sample_impl.h says how. A row with no
    finite logit picks token 0."""
    rows, vocab = weights.shape
    if weights.dtype is not torch.float32 or weights.stride(1) != 1:
        raise ValueError(f"sample: logits {tuple(weights.shape)} {weights.dtype} must be float32 with contiguous rows")
    temperature, top_p, min_p = (t.to(torch.float32).contiguous() for t in (temperature, top_p, min_p))
    top_k, u = _int64(top_k), u.to(torch.float64).contiguous()
    if any(t.shape != (rows,) for t in (temperature, top_k, top_p, min_p, u)):
        raise ValueError(f"sample: each row's parameters must be ({rows},) tensors")
    out = torch.empty(rows, dtype=torch.int64)
    _kernels.sample(rows, vocab, weights.data_ptr(), _row_stride(weights), temperature.data_ptr(), top_k.data_ptr(),
                    top_p.data_ptr(), min_p.data_ptr(), u.data_ptr(), out.data_ptr())
    return out.tolist()


def apply_repetition_penalty(logits: torch.Tensor, rows: list[int], ids: list[torch.Tensor],
                             penalties: list[float]) -> None:
    """Hugging Face's repetition penalty, in place on logits (B, V) float32 with contiguous rows: in row rows[i],
    each of the distinct token ids ids[i] (int64) has its logit divided by penalties[i] if positive, else
    multiplied by it."""
    if logits.dtype is not torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"repetition_penalty: logits {tuple(logits.shape)} {logits.dtype} must be float32 (B, V) "
                         "with contiguous rows")
    if not len(rows) == len(ids) == len(penalties):
        raise ValueError("repetition_penalty: one id tensor and one penalty per row")
    batch, vocab = logits.shape
    flat = _int64(torch.cat(ids)) if ids else torch.zeros(0, dtype=torch.int64)
    offsets = torch.tensor([0] + [t.numel() for t in ids], dtype=torch.int64).cumsum_(0)
    row_ids, penalty = torch.tensor(rows, dtype=torch.int64), torch.tensor(penalties, dtype=torch.float32)
    _kernels.repetition_penalty(len(rows), batch, vocab, logits.data_ptr(), _row_stride(logits), row_ids.data_ptr(),
                                offsets.data_ptr(), flat.data_ptr(), penalty.data_ptr())


def dequantize_kv(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A cache (or rows of one) as float32: int8 rows times their scales; float caches as they are."""
    if cache.dtype is not torch.int8:
        return cache.float()
    return cache.float() * scale.unsqueeze(-1)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x as a 2-D float32/bfloat16 view (rows, last dim) with contiguous rows, copying only if needed."""
    if x.dtype not in _FLOAT_TYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; the kernels take float32 or bfloat16")
    if x.is_contiguous():  # the usual case, in one check
        return x if x.dim() == 2 else x.view(-1, x.shape[-1])
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2


def _int64(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous int64, converting only if needed (the engine already passes that)."""
    return t if t.dtype is torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def _row_stride(x2: torch.Tensor) -> int:
    """Elements between rows of a 2-D tensor from _rows() (a single row may report any stride)."""
    return x2.stride(0) if x2.shape[0] > 1 else x2.shape[1]


def _vector(w: torch.Tensor, size: int, name: str) -> torch.Tensor:
    if w.shape != (size,) or w.dtype not in _FLOAT_TYPES:
        raise ValueError(f"{name} {tuple(w.shape)} {w.dtype} must be float32/bfloat16 ({size},)")
    return w if w.is_contiguous() else w.contiguous()


# ---- references (plain PyTorch)

def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h.to(x.dtype).float()).to(x.dtype)


def reference_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


def reference_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def rotate(x):  # (T, heads, D)
        rot = 2 * cos.shape[1]
        c = torch.cat([cos, cos], dim=-1)[positions][:, None, :]  # (T, 1, rot)
        s = torch.cat([sin, sin], dim=-1)[positions][:, None, :]
        xr = x[..., :rot].float()
        x1, x2 = xr.chunk(2, dim=-1)
        out = xr * c + torch.cat([-x2, x1], dim=-1) * s
        return torch.cat([out.to(x.dtype), x[..., rot:]], dim=-1)

    return rotate(q), rotate(k)


def reference_write_kv(k, v, k_cache, v_cache, slots, k_scale=None, v_scale=None) -> None:
    block_size = k_cache.shape[2]
    for t, slot in enumerate(slots.tolist()):
        for src, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
            row = src[t].float()  # (KVH, D)
            if cache.dtype is torch.int8:
                amax = row.abs().amax(-1, keepdim=True)  # (KVH, 1)
                scales[slot // block_size, :, slot % block_size] = (amax / 127).squeeze(-1)
                inv = torch.full_like(amax, 127.0) / amax  # float32 division, as the kernel: not 127 / amax
                row = torch.where(amax > 0, row * inv, 0.0).round()
            cache[slot // block_size, :, slot % block_size] = row.to(cache.dtype)


def reference_prefill_attention(q, k, v, scale) -> torch.Tensor:
    length, heads, _ = q.shape
    context, kv_heads, _ = k.shape
    kf = k.float().repeat_interleave(heads // kv_heads, dim=1)  # (C, H, D)
    vf = v.float().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("lhd,chd->hlc", q.float(), kf) * scale  # (H, L, C)
    visible = torch.arange(context).unsqueeze(0) <= torch.arange(context - length, context).unsqueeze(1)  # (L, C)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hlc,chd->lhd", scores.softmax(-1), vf).to(q.dtype)


def reference_paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale=None,
                                     v_scale=None) -> torch.Tensor:
    batch, heads, d = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    k_cache, v_cache = dequantize_kv(k_cache, k_scale), dequantize_kv(v_cache, v_scale)
    out = torch.zeros(batch, heads, d)
    for b in range(batch):
        n = int(context_lens[b])
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].transpose(1, 2).reshape(-1, kv_heads, d)[:n].float()  # (n, KVH, D)
        v = v_cache[blocks].transpose(1, 2).reshape(-1, kv_heads, d)[:n].float()
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # (n, H, D)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out.to(q.dtype)


def reference_sample_weights(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                             min_p: float) -> torch.Tensor:
    """What sample() draws a row (V,) from: (V,) weights, 0 for the tokens it cuts. The draw walks them in
    vocabulary order and picks the first token whose running weight passes u times their total. Weights are
    exp(max((logit - max) / T, -87)), 0 for a -inf or NaN logit; min-p keeps those at least min_p, top-k those at
    least the k-th largest, top-p the fewest heaviest (lower ids first among equals) reaching top_p of the total."""
    top = logits.nan_to_num(nan=float("-inf"), posinf=float("inf")).max()  # NaN passed over, as by the kernel
    x = ((logits.float() - top) / temperature).clamp(min=-87.0)
    w = torch.where(logits > float("-inf"), x.exp(), 0.0)
    w = torch.where(w >= min_p, w, 0.0)
    if 0 < top_k < w.numel():
        w = torch.where(w >= w.topk(top_k).values[-1], w, 0.0)
    if top_p < 1.0:
        order = torch.sort(-w, stable=True).indices  # heaviest first, ties by id
        ordered = w[order].double()
        keep = (ordered.cumsum(0) - ordered) < top_p * ordered.sum()
        keep[0] = True
        w = torch.zeros_like(w).index_put_((order[keep],), w[order[keep]])
    return w


def reference_repetition_penalty(logits: torch.Tensor, rows: list[int], ids: list[torch.Tensor],
                                 penalties: list[float]) -> None:
    for row, seen, penalty in zip(rows, ids, penalties):
        values = logits[row, seen]
        logits[row, seen] = torch.where(values > 0, values / penalty, values * penalty)
