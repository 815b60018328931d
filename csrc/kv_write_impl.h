// New tokens' K and V into their paged cache slots, converted to the cache's type (int8 rows with a scale each).
// Included by ops_impl.h (inside its anonymous namespace) after attention_impl.h, whose kMaxChunks bounds a row.

// One K or V row (d <= 256 elements) to int8 with a scale: q = round(x * 127 / max |x|), x ~ q * scale.
// No fused multiply-add: the product is rounded before rounding to an integer, on every ISA level alike.
__attribute__((optimize("fp-contract=off"))) inline void quantize_row(const void* src, DType type, int64_t offset, int64_t d, int8_t* dst, float* scale) {
    alignas(64) float x[kMaxChunks * 2 * kLanes];
    vf top = {};
    for (int64_t i = 0; i < d; i += kLanes) {
        const int n = d - i < kLanes ? static_cast<int>(d - i) : kLanes;
        const vf v = load_any(src, type, offset + i, n);
        vstore(x + i, v);
        const vf mag = v < 0.0f ? -v : v;
        top = mag > top ? mag : top;
    }
    const float amax = hmax(top);
    *scale = amax / 127.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int64_t i = 0; i < d; i += kLanes) {
        // Adding and taking away 1.5 * 2^23 rounds |v| <= 127 to the nearest integer, ties to even (as lrintf).
        const vf r = (vload(x + i) * inv + 12582912.0f) - 12582912.0f;
        const vc q = __builtin_convertvector(__builtin_convertvector(r, vi), vc);
        __builtin_memcpy(dst + i, &q, d - i < kLanes ? d - i : kLanes);
    }
}

void kv_write_tokens(void* ctx, int64_t begin, int64_t end) {
    const KvWriteArgs& a = *static_cast<const KvWriteArgs*>(ctx);
    const int64_t d = a.head_dim;
    for (int64_t t = begin; t < end; ++t) {
        const int64_t blk = a.slots[t] / a.block_size, off = a.slots[t] % a.block_size;
        for (int64_t h = 0; h < a.kv_heads; ++h) {
            const int64_t row = (blk * a.kv_heads + h) * a.block_size + off, dst = row * d;
            if (a.kv_type == DType::i8) {
                quantize_row(a.k, a.k_type, t * a.k_stride_t + h * a.k_stride_h, d, static_cast<int8_t*>(a.k_cache) + dst,
                             a.k_scale + row);
                quantize_row(a.v, a.v_type, t * a.v_stride_t + h * a.v_stride_h, d, static_cast<int8_t*>(a.v_cache) + dst,
                             a.v_scale + row);
                continue;
            }
            for (int64_t i = 0; i < d; i += kLanes) {
                const int n = d - i < kLanes ? static_cast<int>(d - i) : kLanes;
                store_any(a.k_cache, a.kv_type, dst + i, load_any(a.k, a.k_type, t * a.k_stride_t + h * a.k_stride_h + i, n), n);
                store_any(a.v_cache, a.kv_type, dst + i, load_any(a.v, a.v_type, t * a.v_stride_t + h * a.v_stride_h + i, n), n);
            }
        }
    }
}

void kv_write(const KvWriteArgs& a) {
    KvWriteArgs copy = a;
    if (a.tokens >= 64) parallel_for(a.tokens, kv_write_tokens, &copy);
    else kv_write_tokens(&copy, 0, a.tokens);
}
