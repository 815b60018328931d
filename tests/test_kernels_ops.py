"""Fused ops and paged decode attention on every ISA level, against the PyTorch references."""

import pytest
import torch

from ironlm import kernels

DTYPES = [torch.float32, torch.bfloat16]


def close(actual, expected, dtype):
    # bf16 results may differ by a rounding of the last bit after float32 math in another order.
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 64), (3, 100), (17, 576), (70, 576)])  # the last one on the pool
def test_rms_norm(isa, dtype, rows, dim):
    g = torch.Generator().manual_seed(rows + dim)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    w = torch.randn(dim, generator=g).to(dtype)
    close(kernels.rms_norm(x, w, 1e-5), kernels.reference_rms_norm(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 70])  # the last one on the pool
def test_rms_norm_of_heads_in_a_fused_qkv_output(isa, dtype, tokens):
    # Qwen3's q and k norms: (T, H, D) views of a (T, (H + 2 KVH) D) output, read in place.
    g = torch.Generator().manual_seed(tokens)
    qkv = (torch.randn(tokens, 6 + 2 * 2, 64, generator=g) * 3).to(dtype)
    q, k = qkv[:, :6], qkv[:, 6:8]
    w = torch.randn(64, generator=g).to(dtype)
    for heads in (q, k):
        out = kernels.rms_norm(heads, w, 1e-6)
        assert out.shape == heads.shape and out.is_contiguous()
        close(out, kernels.reference_rms_norm(heads, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_residual(isa, dtype):
    g = torch.Generator().manual_seed(1)
    x, residual = torch.randn(9, 200, generator=g).to(dtype), torch.randn(9, 200, generator=g).to(dtype)
    w = torch.rand(200, generator=g).to(dtype)
    start = residual.clone()
    expected_residual = residual + x
    expected = kernels.reference_rms_norm(expected_residual, w, 1e-6)
    out = kernels.add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(residual, expected_residual)
    close(out, expected, dtype)
    # in place over x: x itself, a 3-D x (through a view), rows with gaps between them (written in place),
    # a column-major x (through a copy)
    for shape_of in (lambda t: t, lambda t: t.view(3, 3, 200), lambda t: torch.cat([t, t], dim=1)[:, :200],
                     lambda t: t.t().contiguous().t()):
        residual = start.clone()
        x_in = shape_of(x.clone())
        out = kernels.add_rms_norm(x_in, residual, w, 1e-6, in_place=True)
        assert torch.equal(residual, expected_residual)
        close(out.reshape(9, 200), expected, dtype)
        if x_in.stride(-1) == 1:
            assert out.data_ptr() == x_in.data_ptr() and torch.equal(x_in.reshape(9, 200), out.reshape(9, 200))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 16), (2, 37), (5, 1536), (12, 1536)])  # the last one on the pool
def test_silu_mul(isa, dtype, rows, inter):
    g = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # exp overflow and underflow
    close(kernels.silu_mul(gate_up), kernels.reference_silu_mul(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rot_dim", [(64, 64), (128, 128), (80, 48)])
@pytest.mark.parametrize("tokens", [4, 90])  # 90 tokens go to the pool
def test_rope(isa, dtype, head_dim, rot_dim, tokens):
    g = torch.Generator().manual_seed(head_dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    cos, sin = kernels.rope_cos_sin(inv_freq, 4096)
    positions = torch.tensor([0, 5, 4095, 17] + list(range(100, 100 + tokens - 4)))
    qkv = torch.randn(tokens, 9 * head_dim, generator=g).to(dtype)
    q = qkv[:, : 6 * head_dim].view(tokens, 6, head_dim)  # strided views into a fused qkv, as models use
    k = qkv[:, 6 * head_dim : 8 * head_dim].view(tokens, 2, head_dim)
    ref_q, ref_k = kernels.reference_rope(q.clone(), k.clone(), positions, cos, sin)
    kernels.apply_rope(q, k, positions, cos, sin)
    close(q, ref_q, dtype)
    close(k, ref_k, dtype)


def test_rope_rejects_position_outside_cache():
    cos, sin = torch.zeros(8, 32), torch.zeros(8, 32)
    q, k = torch.zeros(1, 2, 64), torch.zeros(1, 2, 64)
    with pytest.raises(ValueError, match="position"):
        kernels.apply_rope(q, k, torch.tensor([8]), cos, sin)


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (9, 3, 64), (8, 2, 128), (6, 1, 40), (12, 1, 64), (20, 2, 48),
                                                    (8, 8, 128), (6, 3, 128)])  # (6, 3, 128): V slabs, the last one shorter
def test_paged_attention_decode(isa, kv_dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads * head_dim)
    num_blocks, block_size = 20, 16
    pool = torch.randn(2, 2, num_blocks, kv_heads, block_size, head_dim, generator=g).to(kv_dtype)
    k_cache, v_cache = pool[1, 0], pool[1, 1]  # layer 1 of a [layers, 2, ...] pool
    context_lens = torch.tensor([1, 16, 37, 70], dtype=torch.int32)
    block_tables = torch.zeros(4, 5, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    block_tables[0, :1], block_tables[1, :1], block_tables[2, :3], block_tables[3, :5] = (
        perm[0:1], perm[1:2], perm[2:5], perm[5:10])
    q = torch.randn(4, heads, head_dim, generator=g).to(kv_dtype)
    scale = head_dim ** -0.5
    out = kernels.paged_attention_decode(q, kernels.PagedCache(k_cache, v_cache), block_tables, context_lens, scale)
    ref = kernels.reference_paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    close(out, ref, kv_dtype)



@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 32, 64), (16, 2, 128)])
def test_paged_attention_decode_long_contexts(isa, heads, kv_heads, head_dim):
    # Long contexts split into several stretches per sequence, whose partial softmaxes are merged; an
    # empty context gives zeros.
    g = torch.Generator().manual_seed(7)
    num_blocks, block_size = 64, 16
    k_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g).bfloat16()
    v_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g).bfloat16()
    context_lens = torch.tensor([300, 0, 517], dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    block_tables = torch.zeros(3, 33, dtype=torch.int32)
    block_tables[0, :19], block_tables[2, :33] = perm[:19], perm[19:52]
    q = torch.randn(3, heads, head_dim, generator=g).bfloat16()
    out = kernels.paged_attention_decode(q, kernels.PagedCache(k_cache, v_cache), block_tables, context_lens,
                                         head_dim ** -0.5)
    ref = kernels.reference_paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, head_dim ** -0.5)
    close(out, ref, torch.bfloat16)
    assert torch.count_nonzero(out[1]) == 0

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length,context,heads,kv_heads,head_dim", [
    (1, 1, 2, 1, 16),        # a single token
    (37, 37, 4, 2, 64),      # a whole prompt, not a multiple of the 24-row tasks, the row tiles or the key blocks
    (100, 300, 9, 3, 64),    # a chunk after 200 cached tokens, grouped heads
    (5, 70, 4, 4, 80),       # head_dim padded to 128 inside the kernel
    (129, 129, 8, 2, 128),
    (200, 1024, 24, 12, 64),  # 12 kv heads of 1,024 keys: packed and attended in slices of 8 and 4 kv heads
])
def test_prefill_attention(isa, dtype, length, context, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(length, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(context, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(context, kv_heads, head_dim, generator=g).to(dtype)
    scale = head_dim ** -0.5
    close(kernels.prefill_attention(q, k, v, scale), kernels.reference_prefill_attention(q, k, v, scale), dtype)


def test_prefill_attention_strided_views_and_mixed_dtypes(isa):
    # q, k, v cut from one fused (T, (H + 2 KVH) * D) projection, as the model passes them; K/V float32
    # from a gathered cache with a bf16 q.
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(50, (6 + 2 * 2) * 32, generator=g).bfloat16()
    q, k, v = qkv.split([6 * 32, 2 * 32, 2 * 32], dim=-1)
    q, k, v = q.view(50, 6, 32), k.view(50, 2, 32), v.view(50, 2, 32)
    close(kernels.prefill_attention(q, k, v, 0.2), kernels.reference_prefill_attention(q, k, v, 0.2), torch.bfloat16)
    out = kernels.prefill_attention(q[40:], k.float(), v.float(), 0.2)
    close(out, kernels.reference_prefill_attention(q[40:], k.float(), v.float(), 0.2), torch.bfloat16)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("length,context,heads,kv_heads,head_dim", [
    (100, 300, 9, 3, 64),     # a chunk after 200 cached tokens in scattered blocks, grouped heads
    (5, 70, 4, 4, 80),        # head_dim padded inside the kernel; the context ends inside a block
    (64, 1024, 24, 12, 64),   # several slices of kv heads
])
def test_prefill_attention_paged(isa, kv_dtype, length, context, heads, kv_heads, head_dim):
    # A later prompt chunk reads its context from the paged cache (int8 rows dequantized as they are read):
    # the same as attending over the context gathered from its blocks.
    g = torch.Generator().manual_seed(context + head_dim)
    num_blocks, block_size = 80, 16
    shape = (num_blocks, kv_heads, block_size, head_dim)
    scales = [None, None]
    if kv_dtype is torch.int8:
        k_cache = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        v_cache = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        scales = [torch.rand(shape[:3], generator=g) * 0.05 for _ in range(2)]
    else:
        k_cache, v_cache = torch.randn(shape, generator=g).to(kv_dtype), torch.randn(shape, generator=g).to(kv_dtype)
    blocks = -(-context // block_size)
    table = torch.randperm(num_blocks, generator=g)[:blocks + 2].to(torch.int32)  # longer than needed, as the engine's
    q = torch.randn(length, heads, head_dim, generator=g).bfloat16()
    scale = head_dim ** -0.5
    out = kernels.prefill_attention_paged(q, kernels.PagedCache(k_cache, v_cache, *scales), table, context, scale)

    def gather(cache, cache_scale):  # (context, KVH, D) float32
        rows = kernels.dequantize_kv(cache[table[:blocks].long()], None if cache_scale is None else cache_scale[table[:blocks].long()])
        return rows.transpose(1, 2).flatten(0, 1)[:context]

    ref = kernels.reference_prefill_attention(q, gather(k_cache, scales[0]), gather(v_cache, scales[1]), scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    close(out, ref, torch.bfloat16)
    with pytest.raises(ValueError, match="context exceeds the block table"):
        kernels.prefill_attention_paged(q, kernels.PagedCache(k_cache, v_cache, *scales), table[:blocks - 1], context, scale)
    bad = table.clone()
    bad[0] = num_blocks
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.prefill_attention_paged(q, kernels.PagedCache(k_cache, v_cache, *scales), bad, context, scale)


def test_prefill_attention_rejects_bad_shapes():
    q = torch.randn(4, 3, 16)
    with pytest.raises(ValueError, match="must be a multiple of KVH"):
        kernels.prefill_attention(q, torch.randn(4, 2, 16), torch.randn(4, 2, 16), 1.0)
    with pytest.raises(ValueError, match="q_len <= context"):
        kernels.prefill_attention(q, torch.randn(3, 1, 16), torch.randn(3, 1, 16), 1.0)
    with pytest.raises(ValueError, match="contiguous D"):
        kernels.prefill_attention(q, torch.randn(4, 1, 16), torch.randn(4, 1, 8), 1.0)


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("src_dtype", DTYPES)
def test_write_kv(isa, kv_dtype, src_dtype):
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.zeros(6, 3, 16, 40, dtype=kv_dtype), torch.zeros(6, 3, 16, 40, dtype=kv_dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    kv = torch.randn(5, 2, 3, 40, generator=g).to(src_dtype)
    k, v = kv[:, 0], kv[:, 1]  # strided views, as a fused qkv output gives
    slots = torch.tensor([0, 17, 18, 95, 40])
    kernels.write_kv(k, v, kernels.PagedCache(k_cache, v_cache), slots)
    kernels.reference_write_kv(k, v, ref_k, ref_v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    with pytest.raises(ValueError, match="slot outside"):
        kernels.write_kv(k, v, kernels.PagedCache(k_cache, v_cache), torch.tensor([0, 1, 2, 3, 96]))


@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [40, 64, 128])
def test_write_kv_int8(isa, src_dtype, head_dim):
    # Each row becomes round(x * 127 / max|x|) with scale max|x| / 127; an all-zero row gets scale 0.
    g = torch.Generator().manual_seed(head_dim)
    k_cache, v_cache = torch.zeros(6, 3, 16, head_dim, dtype=torch.int8), torch.zeros(6, 3, 16, head_dim, dtype=torch.int8)
    k_scale, v_scale = torch.zeros(6, 3, 16), torch.zeros(6, 3, 16)
    refs = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    kv = torch.randn(5, 2, 3, head_dim, generator=g).to(src_dtype) * 3
    kv[2, 1, 0] = 0.0
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.tensor([0, 17, 18, 95, 40])
    kernels.write_kv(k, v, kernels.PagedCache(k_cache, v_cache, k_scale, v_scale), slots)
    kernels.reference_write_kv(k, v, *refs[:2], slots, *refs[2:])
    assert torch.equal(k_cache, refs[0]) and torch.equal(v_cache, refs[1])
    torch.testing.assert_close(k_scale, refs[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(v_scale, refs[3], rtol=1e-6, atol=0)
    assert v_scale[2, 0, 2] == 0 and k_cache.abs().max() == 127
    # what comes back is within half a step of what went in
    back = kernels.dequantize_kv(k_cache[1, :, 1], k_scale[1, :, 1])  # slot 17 = token 1
    assert (back - k[1].float()).abs().max() <= k_scale[1, :, 1].max() / 2 + 1e-6


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (9, 3, 64), (8, 8, 40), (16, 2, 128)])
def test_paged_attention_decode_int8(isa, heads, kv_heads, head_dim):
    # int8 rows with their scales against the same rows dequantized; contexts across several stretches.
    g = torch.Generator().manual_seed(heads + head_dim)
    num_blocks, block_size = 48, 16
    k_cache = torch.randint(-127, 128, (num_blocks, kv_heads, block_size, head_dim), generator=g, dtype=torch.int8)
    v_cache = torch.randint(-127, 128, (num_blocks, kv_heads, block_size, head_dim), generator=g, dtype=torch.int8)
    k_scale = torch.rand(num_blocks, kv_heads, block_size, generator=g) * 0.05
    v_scale = torch.rand(num_blocks, kv_heads, block_size, generator=g) * 0.05
    context_lens = torch.tensor([1, 37, 300, 0], dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    block_tables = torch.zeros(4, 19, dtype=torch.int32)
    block_tables[0, :1], block_tables[1, :3], block_tables[2, :19] = perm[:1], perm[1:4], perm[4:23]
    q = torch.randn(4, heads, head_dim, generator=g).bfloat16()
    scale = head_dim ** -0.5
    out = kernels.paged_attention_decode(q, kernels.PagedCache(k_cache, v_cache, k_scale, v_scale), block_tables,
                                         context_lens, scale)
    ref = kernels.reference_paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale,
                                                   v_scale)
    close(out, ref, torch.bfloat16)
    with pytest.raises(ValueError, match="needs contiguous float32 K and V scales"):
        kernels.PagedCache(k_cache, v_cache)
    with pytest.raises(ValueError, match="only with an int8 cache"):
        kernels.PagedCache(k_cache.float(), v_cache.float(), k_scale, v_scale)


def test_paged_attention_rejects_bad_block_table():
    k = torch.zeros(4, 2, 16, 64)
    q = torch.zeros(1, 2, 64)
    tables = torch.tensor([[7]], dtype=torch.int32)
    with pytest.raises(ValueError, match="block table"):
        kernels.paged_attention_decode(q, kernels.PagedCache(k, k), tables, torch.tensor([5], dtype=torch.int32), 1.0)


def test_paged_cache_and_decode_reject_mismatches():
    k = torch.zeros(4, 2, 16, 64)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.PagedCache(k, torch.zeros(4, 2, 16, 32))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.PagedCache(k.transpose(1, 2), k.transpose(1, 2))
    with pytest.raises(ValueError, match="float32, bfloat16 or int8"):
        kernels.PagedCache(k.half(), k.half())
    cache = kernels.PagedCache(k, k)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of the cache's 2 kv heads"):
        kernels.paged_attention_decode(torch.zeros(1, 3, 64), cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match=r"\(B, H, 64\)"):
        kernels.paged_attention_decode(torch.zeros(1, 2, 32), cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="context_lens"):
        kernels.paged_attention_decode(torch.zeros(1, 2, 64), cache, tables, lens.long(), 1.0)
    with pytest.raises(ValueError, match=r"\(T, 2, 64\)"):
        kernels.write_kv(torch.zeros(1, 1, 64), torch.zeros(1, 1, 64), cache, torch.zeros(1, dtype=torch.int64))


def sample_test_logits(vocab: int) -> torch.Tensor:
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    logits[1, :5] += 9.0                      # peaked: the nucleus is a few tokens
    logits[2] = 0.0                           # flat: every token ties, so top-k and top-p cut by id
    logits[3, ::7] = float("-inf")            # masked tokens weigh nothing
    logits[4, [3, 500]] = float("nan")        # as do NaN ones
    logits[5] = (logits[5] * 2).round() / 2   # many ties
    return logits


SAMPLE_PARAMS = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0), (0.7, 0, 0.95, 0.0), (0.7, 40, 1.0, 0.05), (1.3, 5, 0.9, 0.1), (0.2, 0, 0.9, 0.0),
    (3.0, 0, 0.5, 0.0), (1.0, 300, 0.99, 0.0), (0.05, 2, 1.0, 0.0),
]


@pytest.mark.parametrize("vocab", [1003, 49152])
def test_sample_weights_and_draws_match_the_reference(isa, vocab):
    # Each row of each parameter set is drawn several times, u placed mid-way through a kept token's share of the
    # reference's running weight (so rounding cannot move it across a neighbour): the first and last kept tokens,
    # the heaviest, and a few others. The kernel must pick that token, and leave the reference's weights behind.
    logits = sample_test_logits(vocab)
    gen = torch.Generator().manual_seed(1)
    for temperature, top_k, top_p, min_p in SAMPLE_PARAMS:
        rows, us, expected, weights = [], [], [], []
        for row in logits:
            w = kernels.reference_sample_weights(row, temperature, top_k, top_p, min_p)
            cdf = w.double().cumsum(0)
            total = float(cdf[-1])
            kept = w.nonzero().flatten()
            picks = {int(kept[0]), int(kept[-1]), int(w.argmax())}
            picks |= {int(kept[i]) for i in torch.randint(0, kept.numel(), (4,), generator=gen)}
            for token in sorted(picks):
                if w[token] / total < 1e-5:  # a share too thin to place u inside it with room for rounding
                    continue
                rows.append(row)
                us.append((float(cdf[token]) - float(w[token]) / 2) / total)
                expected.append(token)
                weights.append(w)
        batch = torch.stack(rows)
        n = len(rows)
        picked = kernels.sample(batch, torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), top_p),
                                torch.full((n,), min_p), torch.tensor(us, dtype=torch.float64))
        assert picked == expected, (temperature, top_k, top_p, min_p)
        reference = torch.stack(weights)
        assert torch.equal(batch > 0, reference > 0), (temperature, top_k, top_p, min_p)  # the same tokens kept
        torch.testing.assert_close(batch, reference, rtol=1e-5, atol=0)


def test_sample_cuts_by_count_and_mass(isa):
    # Hand-made weights: top-k keeps every tie of the k-th weight; top-p stops at the token whose share reaches it.
    probs = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.1, 0.1])
    one = dict(temperature=torch.ones(1), top_p=torch.ones(1), min_p=torch.zeros(1),
               u=torch.zeros(1, dtype=torch.float64))
    w = probs.log()[None].clone()
    kernels.sample(w, top_k=torch.tensor([3]), **one)
    assert (w[0] > 0).tolist() == [False, True, True, True, True, True]  # 0.4, 0.25 and the three 0.1s
    w = probs.log()[None].clone()
    kernels.sample(w, top_k=torch.zeros(1, dtype=torch.int64), **dict(one, top_p=torch.tensor([0.7])))
    assert (w[0] > 0).tolist() == [False, True, True, True, False, False]  # 0.4 + 0.25 < 0.7: the first 0.1 (id 2)
    rows = torch.full((2, 5), float("-inf"))
    rows[1, 4] = 0.0
    assert kernels.sample(rows, torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.ones(2), torch.zeros(2),
                          torch.full((2,), 0.5, dtype=torch.float64)) == [0, 4]


def test_sample_rejects_bad_parameters():
    logits = torch.zeros(1, 8)
    good = dict(temperature=torch.ones(1), top_k=torch.zeros(1, dtype=torch.int64), top_p=torch.ones(1),
                min_p=torch.zeros(1), u=torch.zeros(1, dtype=torch.float64))
    for name, value, match in [("temperature", torch.zeros(1), "temperature"), ("top_p", torch.zeros(1), "top_p"),
                               ("min_p", torch.full((1,), 1.5), "min_p"), ("u", torch.ones(1), "u must be"),
                               ("top_k", torch.zeros(2, dtype=torch.int64), r"\(1,\)")]:
        with pytest.raises(ValueError, match=match):
            kernels.sample(logits.clone(), **dict(good, **{name: value}))
    with pytest.raises(ValueError, match="float32"):
        kernels.sample(logits.double(), **good)


def test_repetition_penalty_matches_the_reference(isa):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 1003, generator=gen) * 4
    rows, penalties = [0, 2, 4], [1.3, 0.8, 2.0]
    ids = [torch.randperm(1003, generator=gen)[:n] for n in (700, 1, 0)]  # distinct ids; a row with none
    actual, expected = logits.clone(), logits.clone()
    kernels.apply_repetition_penalty(actual, rows, ids, penalties)
    kernels.reference_repetition_penalty(expected, rows, ids, penalties)
    assert torch.equal(actual, expected)
    assert torch.equal(actual[[1, 3]], logits[[1, 3]])  # rows not listed are left alone
    assert not torch.equal(actual[0], logits[0])


def test_repetition_penalty_rejects_bad_input():
    logits = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kernels.apply_repetition_penalty(logits, [0], [torch.tensor([8])], [1.1])
    with pytest.raises(ValueError, match="outside the batch"):
        kernels.apply_repetition_penalty(logits, [2], [torch.tensor([1])], [1.1])
    with pytest.raises(ValueError, match="> 0"):
        kernels.apply_repetition_penalty(logits, [0], [torch.tensor([1])], [0.0])
    with pytest.raises(ValueError, match="float32"):
        kernels.apply_repetition_penalty(logits.double(), [0], [torch.tensor([1])], [1.1])
