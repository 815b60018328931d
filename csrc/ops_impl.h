// Fused small ops and paged decode attention, written once with GCC vector extensions and
// compiled per ISA level (ops_scalar.cpp, ops_avx2.cpp, ops_avx512.cpp): a 16-float vector
// becomes one zmm, two ymm or four xmm. Included inside an anonymous namespace.

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
constexpr int kLanes = 16;

inline v16f splat(float v) { return v16f{} + v; }

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

inline float hsum(v16f v) {  // a tree of half-width adds
    v8f lo, hi;
    __builtin_memcpy(&lo, &v, 32);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
    lo += hi;
    v4f a, b;
    __builtin_memcpy(&a, &lo, 16);
    __builtin_memcpy(&b, reinterpret_cast<const char*>(&lo) + 16, 16);
    a += b;
    return (a[0] + a[2]) + (a[1] + a[3]);
}

// Loads and stores of 16 elements (n < 16 for a row's tail: the rest reads as 0).
inline v16f load16(const float* p, int n = kLanes) {
    v16f v = {};
    if (n == kLanes) __builtin_memcpy(&v, p, 64);
    else __builtin_memcpy(&v, p, n * 4);
    return v;
}

inline v16f load16(const uint16_t* p, int n = kLanes) {
    v16h h = {};
    if (n == kLanes) __builtin_memcpy(&h, p, 32);
    else __builtin_memcpy(&h, p, n * 2);
    const v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    __builtin_memcpy(&f, &u, 64);
    return f;
}

inline void store16(float* p, v16f v, int n = kLanes) {
    if (n == kLanes) __builtin_memcpy(p, &v, 64);  // constant size: one vector store, no call
    else __builtin_memcpy(p, &v, n * 4);
}

inline void store16(uint16_t* p, v16f v, int n = kLanes) {
    v16u u;
    __builtin_memcpy(&u, &v, 64);
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (NaN payloads are not preserved)
    const v16h h = __builtin_convertvector(u >> 16, v16h);
    if (n == kLanes) __builtin_memcpy(p, &h, 32);
    else __builtin_memcpy(p, &h, n * 2);
}

inline v16f round_bf16(v16f v) {  // what storing as bf16 and loading back gives
    alignas(64) uint16_t t[kLanes];
    store16(t, v);
    return load16(t);
}

inline v16f load_any(const void* p, DType t, int64_t i, int n = kLanes) {
    return t == DType::f32 ? load16(static_cast<const float*>(p) + i, n) : load16(static_cast<const uint16_t*>(p) + i, n);
}

inline void store_any(void* p, DType t, int64_t i, v16f v, int n = kLanes) {
    if (t == DType::f32) store16(static_cast<float*>(p) + i, v, n);
    else store16(static_cast<uint16_t*>(p) + i, v, n);
}

inline const void* row_ptr(const void* p, DType t, int64_t offset) {
    return static_cast<const char*>(p) + offset * (t == DType::f32 ? 4 : 2);
}

inline void* row_ptr(void* p, DType t, int64_t offset) {
    return static_cast<char*>(p) + offset * (t == DType::f32 ? 4 : 2);
}

// exp for float vectors: 2^n * p(r), |r| <= ln2/2, relative error about 2e-7 (Cephes polynomial).
inline v16f vexp(v16f x) {
    x = x > 88.0f ? splat(88.0f) : x;
    x = x < -88.0f ? splat(-88.0f) : x;
    const v16f fx = x * 1.44269504088896341f;
    v16i n = __builtin_convertvector(fx + (fx >= 0.0f ? splat(0.5f) : splat(-0.5f)), v16i);
    const v16f nf = __builtin_convertvector(n, v16f);
    v16f r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    v16f p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v16i bits = (n + 127) << 23;
    v16f scale;
    __builtin_memcpy(&scale, &bits, 64);
    return p * scale;
}

// ---- RMSNorm, optionally after residual += x. Matches HF: normalise in float32, cast to the
// input dtype, then multiply by the weight.
void rms_norm_rows(void* ctx, int64_t begin, int64_t end) {
    const NormArgs& a = *static_cast<const NormArgs*>(ctx);
    const int64_t d = a.dim;
    for (int64_t r = begin; r < end; ++r) {
        const void* x = row_ptr(a.x, a.x_type, r * a.ldx);
        void* res = a.residual ? row_ptr(a.residual, a.r_type, r * a.ldr) : nullptr;
        const void* src = res ? static_cast<const void*>(res) : x;
        const DType src_type = res ? a.r_type : a.x_type;
        v16f ss = {};
        for (int64_t i = 0; i < d; i += kLanes) {
            const int n = d - i < kLanes ? static_cast<int>(d - i) : kLanes;
            v16f v = load_any(x, a.x_type, i, n);
            if (res) {
                v += load_any(res, a.r_type, i, n);
                store_any(res, a.r_type, i, v, n);
                if (a.r_type == DType::bf16) v = round_bf16(v);
            }
            ss += v * v;
        }
        const float inv = 1.0f / __builtin_sqrtf(hsum(ss) / static_cast<float>(d) + a.eps);
        void* out = row_ptr(a.out, a.o_type, r * a.ldo);
        for (int64_t i = 0; i < d; i += kLanes) {
            const int n = d - i < kLanes ? static_cast<int>(d - i) : kLanes;
            v16f v = load_any(src, src_type, i, n) * inv;
            if (src_type == DType::bf16) v = round_bf16(v);
            store_any(out, a.o_type, i, v * load_any(a.weight, a.w_type, i, n), n);
        }
    }
}

void rms_norm(const NormArgs& a) {
    NormArgs copy = a;
    if (a.rows >= 8) parallel_for(a.rows, rms_norm_rows, &copy);
    else rms_norm_rows(&copy, 0, a.rows);
}

// ---- out = silu(gate) * up, gate_up = [gate | up] per row.
void silu_mul_rows(void* ctx, int64_t begin, int64_t end) {
    const SiluMulArgs& a = *static_cast<const SiluMulArgs*>(ctx);
    for (int64_t r = begin; r < end; ++r) {
        const void* g = row_ptr(a.gate_up, a.g_type, r * a.ldg);
        void* out = row_ptr(a.out, a.o_type, r * a.ldo);
        for (int64_t i = 0; i < a.inter; i += kLanes) {
            const int n = a.inter - i < kLanes ? static_cast<int>(a.inter - i) : kLanes;
            const v16f gate = load_any(g, a.g_type, i, n), up = load_any(g, a.g_type, a.inter + i, n);
            store_any(out, a.o_type, i, gate / (1.0f + vexp(-gate)) * up, n);
        }
    }
}

void silu_mul(const SiluMulArgs& a) {
    SiluMulArgs copy = a;
    if (a.rows * a.inter >= 16384) parallel_for(a.rows, silu_mul_rows, &copy);
    else silu_mul_rows(&copy, 0, a.rows);
}

// ---- Rotary embedding, neox style (rotate_half), in place on q and k.
void rope_head(void* p, DType t, const float* c, const float* s, int64_t half) {
    for (int64_t i = 0; i < half; i += kLanes) {
        const int n = half - i < kLanes ? static_cast<int>(half - i) : kLanes;
        const v16f x1 = load_any(p, t, i, n), x2 = load_any(p, t, half + i, n);
        const v16f cv = load16(c + i, n), sv = load16(s + i, n);
        store_any(p, t, i, x1 * cv - x2 * sv, n);
        store_any(p, t, half + i, x2 * cv + x1 * sv, n);
    }
}

void rope_tokens(void* ctx, int64_t begin, int64_t end) {
    const RopeArgs& a = *static_cast<const RopeArgs*>(ctx);
    const int64_t half = a.rot_dim / 2;
    for (int64_t tok = begin; tok < end; ++tok) {
        const float* c = a.cos + a.positions[tok] * half;
        const float* s = a.sin + a.positions[tok] * half;
        for (int64_t h = 0; h < a.q_heads; ++h)
            rope_head(row_ptr(a.q, a.q_type, tok * a.q_token_stride + h * a.q_head_stride), a.q_type, c, s, half);
        for (int64_t h = 0; h < a.k_heads; ++h)
            rope_head(row_ptr(a.k, a.k_type, tok * a.k_token_stride + h * a.k_head_stride), a.k_type, c, s, half);
    }
}

void rope(const RopeArgs& a) {
    RopeArgs copy = a;
    if (a.tokens >= 8) parallel_for(a.tokens, rope_tokens, &copy);
    else rope_tokens(&copy, 0, a.tokens);
}

// ---- Decode attention over the paged KV cache: one task per (sequence, query head), with q
// and the output row in registers (head_dim <= 256). Heads of a GQA group re-read their kv
// head's rows from cache, which costs less than leaving cores idle with few kv heads.
constexpr int kMaxChunks = 16;

// A head's K/V rows sit one token row (all kv heads) apart, usually on different 4 KiB pages,
// where hardware prefetchers stop; software prefetch keeps a few tokens in flight.
constexpr int64_t kPrefetchTokens = 8;

inline void prefetch_row(const void* p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off, 0, 3);
}

inline int64_t kv_offset(const AttentionArgs& a, const int32_t* table, int64_t t, int64_t kvh) {
    const int64_t slot = static_cast<int64_t>(table[t / a.block_size]) * a.block_size + t % a.block_size;
    return (slot * a.kv_heads + kvh) * a.head_dim;
}

template <int NC>
void attend_head(const AttentionArgs& a, const int32_t* table, int64_t ctx_len, int64_t kvh, const float* qf,
                 float* scores, float* out) {
    const int last = static_cast<int>(a.head_dim - (NC - 1) * kLanes);  // lanes used in the last chunk
    const int64_t row_bytes = a.head_dim * (a.kv_type == DType::f32 ? 4 : 2);
    v16f q[NC];
    for (int c = 0; c < NC; ++c) q[c] = load16(qf + c * kLanes, c == NC - 1 ? last : kLanes);
    float mx = -3.0e38f;
    for (int64_t t = 0; t < ctx_len; ++t) {
        if (t + kPrefetchTokens < ctx_len) prefetch_row(row_ptr(a.k_cache, a.kv_type, kv_offset(a, table, t + kPrefetchTokens, kvh)), row_bytes);
        const void* k = row_ptr(a.k_cache, a.kv_type, kv_offset(a, table, t, kvh));
        v16f dot = {};
        for (int c = 0; c < NC; ++c) dot += q[c] * load_any(k, a.kv_type, c * kLanes, c == NC - 1 ? last : kLanes);
        const float s = hsum(dot);
        scores[t] = s;
        mx = s > mx ? s : mx;
    }
    v16f sum = {};
    for (int64_t t = 0; t < ctx_len; t += kLanes) {
        const int n = ctx_len - t < kLanes ? static_cast<int>(ctx_len - t) : kLanes;
        v16f e = vexp(load16(scores + t, n) - mx);
        for (int i = n; i < kLanes; ++i) e[i] = 0.0f;
        store16(scores + t, e, n);
        sum += e;
    }
    v16f acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = v16f{};
    for (int64_t t = 0; t < ctx_len; ++t) {
        if (t + kPrefetchTokens < ctx_len) prefetch_row(row_ptr(a.v_cache, a.kv_type, kv_offset(a, table, t + kPrefetchTokens, kvh)), row_bytes);
        const void* v = row_ptr(a.v_cache, a.kv_type, kv_offset(a, table, t, kvh));
        const float p = scores[t];
        for (int c = 0; c < NC; ++c) acc[c] += p * load_any(v, a.kv_type, c * kLanes, c == NC - 1 ? last : kLanes);
    }
    const float inv = ctx_len > 0 ? 1.0f / hsum(sum) : 0.0f;
    for (int c = 0; c < NC; ++c) store16(out + c * kLanes, acc[c] * inv, c == NC - 1 ? last : kLanes);
}

template <int NC>
void attend_dispatch(const AttentionArgs& a, const int32_t* table, int64_t ctx_len, int64_t kvh, const float* qf,
                     float* scores, float* out) {
    if constexpr (NC < kMaxChunks) {
        if (a.head_dim > NC * kLanes) return attend_dispatch<NC + 1>(a, table, ctx_len, kvh, qf, scores, out);
    }
    attend_head<NC>(a, table, ctx_len, kvh, qf, scores, out);
}

void attention_tasks(void* ctx, int64_t begin, int64_t end) {
    const AttentionArgs& a = *static_cast<const AttentionArgs*>(ctx);
    const int64_t d = a.head_dim, group = a.heads / a.kv_heads;
    alignas(64) float qf[kMaxChunks * kLanes];
    alignas(64) float out[kMaxChunks * kLanes];
    for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / a.heads, h = task % a.heads;
        const int64_t ctx_len = a.context_lens[b];
        float* scores = static_cast<float*>(scratch_alloc((ctx_len + kLanes) * 4));
        const void* q = row_ptr(a.q, a.q_type, b * a.q_stride_b + h * a.q_stride_h);
        for (int64_t i = 0; i < d; i += kLanes) {
            const int n = d - i < kLanes ? static_cast<int>(d - i) : kLanes;
            store16(qf + i, load_any(q, a.q_type, i, n) * a.scale, n);
        }
        attend_dispatch<1>(a, a.block_tables + b * a.max_blocks, ctx_len, h / group, qf, scores, out);
        for (int64_t i = 0; i < d; i += kLanes) {
            const int n = d - i < kLanes ? static_cast<int>(d - i) : kLanes;
            store_any(a.out, a.o_type, (b * a.heads + h) * d + i, load16(out + i, n), n);
        }
        scratch_free(scores);
    }
}

void attention(const AttentionArgs& a) {
    AttentionArgs copy = a;
    parallel_for(a.batch * a.heads, attention_tasks, &copy);
}

const OpsTable kTable = {rms_norm, silu_mul, rope, attention};
