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

// ---- Decode attention over the paged KV cache: one task per sequence and up to kMaxGroup query
// heads (see HeadSplit). Each K/V row is read once for all query heads that use it, and scores come
// 16 tokens at a time from one shuffle tree instead of one horizontal sum per token.
constexpr int kMaxChunks = 16;  // head_dim <= 256
constexpr int kMaxGroup = 8;    // query heads sharing one pass over a kv head (larger groups are split)

// A head's K/V rows sit one token row (all kv heads) apart, usually on different 4 KiB pages,
// where hardware prefetchers stop; software prefetch keeps a few tokens in flight.
constexpr int64_t kPrefetchTokens = 8;

inline void prefetch_row(const void* p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off, 0, 3);
}

// rows[t] = element offset of token t's row (all kv heads) in the cache, for t < ctx_len: computed once
// per task with counters, as a division per token read would cost more than the read.
inline void token_rows(const AttentionArgs& a, const int32_t* table, int64_t ctx_len, int64_t* rows) {
    const int64_t row = a.kv_heads * a.head_dim;
    for (int64_t t = 0, blk = 0, off = 0; t < ctx_len; ++t) {
        rows[t] = (static_cast<int64_t>(table[blk]) * a.block_size + off) * row;
        if (++off == a.block_size) off = 0, ++blk;
    }
}

// Lane i of the result is the sum of the lanes of x[i]: four rounds of pairwise shuffles and adds.
inline v16f hsum16(const v16f* x) {
    v16f y[8], z[4], w[2];
    for (int i = 0; i < 8; ++i)  // lanes 0-7: 8 partial sums of x[2i]; lanes 8-15: of x[2i+1]
        y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)  // 4 partial sums each of x[4i .. 4i+3]
        z[i] = __builtin_shufflevector(y[2 * i], y[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(y[2 * i], y[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)  // 2 partial sums each of x[8i .. 8i+7]
        w[i] = __builtin_shufflevector(z[2 * i], z[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + __builtin_shufflevector(z[2 * i], z[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

inline float hmax(v16f v) {
    float m = v[0];
    for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
    return m;
}

// num_kv adjacent heads of one token row (K or V) into NC-chunk vectors; `last` lanes in the final chunk.
template <int NC>
inline void load_heads(const AttentionArgs& a, const void* row, int num_kv, int last, v16f (*out)[NC]) {
    for (int h = 0; h < num_kv; ++h)
        for (int c = 0; c < NC; ++c)
            out[h][c] = load_any(row, a.kv_type, h * a.head_dim + c * kLanes, c == NC - 1 ? last : kLanes);
}

// One task's query heads: `count` heads in qf (scaled, zero past head_dim), head g reading kv head
// kvh0 + g / per_kv. The task's kv heads are adjacent in each token row, so a task reads one contiguous
// stretch per token. scores: count rows of `stride` floats (stride >= ctx_len rounded up to 16);
// out: count rows of NC * 16.
template <int NC>
void attend_heads(const AttentionArgs& a, const int64_t* rows, int64_t ctx_len, int64_t kvh0, int count, int per_kv,
                  const float* qf, float* scores, int64_t stride, float* out) {
    const int64_t head0 = kvh0 * a.head_dim;
    const int last = static_cast<int>(a.head_dim - (NC - 1) * kLanes);  // lanes used in the last chunk
    const int num_kv = count / per_kv;  // count is always a multiple of per_kv
    const int64_t span_bytes = num_kv * a.head_dim * (a.kv_type == DType::f32 ? 4 : 2);
    v16f q[kMaxGroup][NC];
    for (int g = 0; g < count; ++g)
        for (int c = 0; c < NC; ++c) q[g][c] = load16(qf + (g * NC + c) * kLanes);
    v16f mx[kMaxGroup];
    for (int g = 0; g < count; ++g) mx[g] = splat(-3.0e38f);
    alignas(64) v16f dots[kMaxGroup][kLanes];
    v16f kc[kMaxGroup][NC];  // the current token's K (then V) rows of the task's kv heads
    for (int64_t t0 = 0; t0 < ctx_len; t0 += kLanes) {
        const int n = ctx_len - t0 < kLanes ? static_cast<int>(ctx_len - t0) : kLanes;
        for (int j = 0; j < n; ++j) {
            const int64_t t = t0 + j;
            if (t + kPrefetchTokens < ctx_len)
                prefetch_row(row_ptr(a.k_cache, a.kv_type, rows[t + kPrefetchTokens] + head0), span_bytes);
            load_heads<NC>(a, row_ptr(a.k_cache, a.kv_type, rows[t] + head0), num_kv, last, kc);
            for (int h = 0; h < num_kv; ++h)
                for (int g = h * per_kv; g < (h + 1) * per_kv; ++g) {
                    v16f d = q[g][0] * kc[h][0];
                    for (int c = 1; c < NC; ++c) d += q[g][c] * kc[h][c];
                    dots[g][j] = d;
                }
        }
        for (int g = 0; g < count; ++g) {
            for (int j = n; j < kLanes; ++j) dots[g][j] = v16f{};
            v16f sc = hsum16(dots[g]);
            store16(scores + g * stride + t0, sc);
            for (int j = n; j < kLanes; ++j) sc[j] = -3.0e38f;  // past the context: not part of the max
            mx[g] = sc > mx[g] ? sc : mx[g];
        }
    }
    float inv[kMaxGroup];
    for (int g = 0; g < count; ++g) {
        float* sg = scores + g * stride;
        const float m = hmax(mx[g]);
        v16f sum = {};
        for (int64_t t = 0; t < ctx_len; t += kLanes) {
            const int n = ctx_len - t < kLanes ? static_cast<int>(ctx_len - t) : kLanes;
            v16f e = vexp(load16(sg + t, n) - m);
            for (int i = n; i < kLanes; ++i) e[i] = 0.0f;
            store16(sg + t, e, n);
            sum += e;
        }
        inv[g] = ctx_len > 0 ? 1.0f / hsum(sum) : 0.0f;
    }
    v16f acc[kMaxGroup][NC];
    for (int g = 0; g < count; ++g)
        for (int c = 0; c < NC; ++c) acc[g][c] = v16f{};
    for (int64_t t = 0; t < ctx_len; ++t) {
        if (t + kPrefetchTokens < ctx_len)
            prefetch_row(row_ptr(a.v_cache, a.kv_type, rows[t + kPrefetchTokens] + head0), span_bytes);
        load_heads<NC>(a, row_ptr(a.v_cache, a.kv_type, rows[t] + head0), num_kv, last, kc);
        for (int h = 0; h < num_kv; ++h)
            for (int g = h * per_kv; g < (h + 1) * per_kv; ++g) {
                const float p = scores[g * stride + t];
                for (int c = 0; c < NC; ++c) acc[g][c] += p * kc[h][c];
            }
    }
    for (int g = 0; g < count; ++g)
        for (int c = 0; c < NC; ++c) store16(out + (g * NC + c) * kLanes, acc[g][c] * inv[g]);
}

// NC = ceil(head_dim / 16) 16-lane chunks per row.
template <int NC>
void attend_dispatch(const AttentionArgs& a, const int64_t* rows, int64_t ctx_len, int64_t kvh0, int count,
                     int per_kv, const float* qf, float* scores, int64_t stride, float* out) {
    if constexpr (NC < kMaxChunks) {
        if (a.head_dim > NC * kLanes)
            return attend_dispatch<NC + 1>(a, rows, ctx_len, kvh0, count, per_kv, qf, scores, stride, out);
    }
    attend_heads<NC>(a, rows, ctx_len, kvh0, count, per_kv, qf, scores, stride, out);
}

// How a sequence's heads split into tasks: a group larger than kMaxGroup is split into parts of a
// single kv head; smaller groups are packed, several whole kv heads per task, as long as that leaves
// every thread a few tasks (few sequences need many streams in flight to reach the bandwidth).
struct HeadSplit {
    int64_t group, kv_per_task, parts_per_kv, tasks_per_seq;
    explicit HeadSplit(const AttentionArgs& a) {
        group = a.heads / a.kv_heads;
        kv_per_task = group >= kMaxGroup ? 1 : kMaxGroup / group;
        const int64_t wanted_tasks = 4 * static_cast<int64_t>(num_threads());
        while (kv_per_task > 1 && a.batch * ((a.kv_heads + kv_per_task - 1) / kv_per_task) < wanted_tasks)
            kv_per_task /= 2;
        parts_per_kv = (group + kMaxGroup - 1) / kMaxGroup;
        tasks_per_seq = (a.kv_heads + kv_per_task - 1) / kv_per_task * parts_per_kv;
    }
};

void attention_tasks(void* ctx, int64_t begin, int64_t end) {
    const AttentionArgs& a = *static_cast<const AttentionArgs*>(ctx);
    const HeadSplit split(a);
    const int64_t d = a.head_dim;
    const int64_t nc = (d + kLanes - 1) / kLanes;  // the NC attend_dispatch picks
    alignas(64) float qf[kMaxGroup * kMaxChunks * kLanes];
    alignas(64) float out[kMaxGroup * kMaxChunks * kLanes];
    for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / split.tasks_per_seq, rest = task % split.tasks_per_seq;
        const int64_t kvh0 = rest / split.parts_per_kv * split.kv_per_task, part = rest % split.parts_per_kv;
        const int64_t h0 = kvh0 * split.group + part * kMaxGroup;  // first query head of the task
        int64_t count, per_kv;
        if (split.parts_per_kv > 1) {  // part of one kv head's group
            count = split.group - part * kMaxGroup < kMaxGroup ? split.group - part * kMaxGroup : kMaxGroup;
            per_kv = count;
        } else {                       // whole groups of up to kv_per_task kv heads
            const int64_t kvs = a.kv_heads - kvh0 < split.kv_per_task ? a.kv_heads - kvh0 : split.kv_per_task;
            count = kvs * split.group;
            per_kv = split.group;
        }
        const int64_t ctx_len = a.context_lens[b];
        const int64_t stride = (ctx_len + kLanes - 1) / kLanes * kLanes;
        // scores (count rows of stride floats), then the token row offsets
        float* scores = static_cast<float*>(scratch_alloc((count * stride + kLanes) * 4 + ctx_len * 8));
        int64_t* rows = reinterpret_cast<int64_t*>(scores + count * stride + kLanes);
        token_rows(a, a.block_tables + b * a.max_blocks, ctx_len, rows);
        for (int64_t g = 0; g < count; ++g) {
            const void* q = row_ptr(a.q, a.q_type, b * a.q_stride_b + (h0 + g) * a.q_stride_h);
            for (int64_t i = 0; i < nc * kLanes; i += kLanes) {
                const int n = d - i >= kLanes ? kLanes : d - i > 0 ? static_cast<int>(d - i) : 0;
                store16(qf + g * nc * kLanes + i, n ? load_any(q, a.q_type, i, n) * a.scale : v16f{});
            }
        }
        attend_dispatch<1>(a, rows, ctx_len, kvh0, static_cast<int>(count),
                           static_cast<int>(per_kv), qf, scores, stride, out);
        for (int64_t g = 0; g < count; ++g)
            for (int64_t i = 0; i < d; i += kLanes) {
                const int n = d - i < kLanes ? static_cast<int>(d - i) : kLanes;
                store_any(a.out, a.o_type, (b * a.heads + h0 + g) * d + i, load16(out + g * nc * kLanes + i, n), n);
            }
        scratch_free(scores);
    }
}

void attention(const AttentionArgs& a) {
    AttentionArgs copy = a;
    parallel_for(a.batch * HeadSplit(a).tasks_per_seq, attention_tasks, &copy);
}

const OpsTable kTable = {rms_norm, silu_mul, rope, attention};
