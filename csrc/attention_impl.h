// Decode attention over the paged KV cache, on the vector primitives of ops_impl.h. Included at the end of
// ops_impl.h, inside the same anonymous namespace, so it is compiled once per ISA level with that level's flags.

// ---- Decode attention over the paged KV cache. The cache is head-major within a block, so one kv
// head's K (or V) rows for a block's tokens are one contiguous run. A task is one stretch of one
// sequence's tokens for all of its heads (flash-decoding), so a single long sequence still keeps every
// thread busy. Inside a task the query heads go in passes over one kv head and a few of the query heads
// that share it (GQA); each leaves its max score, sum of exponentials and unnormalised output, and
// merge_stretches combines a sequence's stretches.
constexpr int64_t kMinStretch = 64;    // tokens: shorter stretches cost more in set-up and merging than they save
// Bytes of a head's rows in flight ahead of the one being read: what keeps the scattered blocks streaming. Counted
// in bytes, not tokens: an int8 row is half a bf16 one, and 64 tokens of it left the int8 cache waiting on DRAM.
constexpr int64_t kPrefetchBytes = 8192;

inline void prefetch_span(const void* p, int64_t bytes, bool l2) {
    for (int64_t off = 0; off < bytes; off += 64) prefetch_line(static_cast<const char*>(p) + off, l2);
}

// One row of Bytes (a constant, the row padded to whole chunks): no loop to run for every token read.
template <int64_t Bytes>
inline void prefetch_row(const void* p, bool l2) {
    for (int64_t off = 0; off < Bytes; off += 64) prefetch_line(static_cast<const char*>(p) + off, l2);
}

// rows[i] = offset of token t0 + i's row for kv head 0 in the cache, for i < n, in units of row_size (head_dim
// for elements, 1 for an int8 cache's scales; head h's row is h * block_size rows further): computed once per
// task with counters, as a division per token read would cost more than the read.
inline void token_rows(const AttentionArgs& a, const int32_t* table, int64_t t0, int64_t n, int64_t* rows,
                       int64_t row_size) {
    for (int64_t i = 0, blk = t0 / a.block_size, off = t0 % a.block_size; i < n; ++i) {
        rows[i] = (static_cast<int64_t>(table[blk]) * a.kv_heads * a.block_size + off) * row_size;
        if (++off == a.block_size) off = 0, ++blk;
    }
}

// Lane i of the result is the sum of the lanes of x[i], x holding kLanes vectors: rounds of pairwise shuffles
// and adds, each halving the partial sums per vector.
inline vf hsum_lanes(const vf* x) {
#if IRONLM_LANES == 16
    vf y[8], z[4], w[2];
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
#elif IRONLM_LANES == 8
    // In-lane shuffles first (one cycle on AMD, no index register), the one cross-lane step last: each 128-bit
    // half of b[i] holds the partial sums of x[4i .. 4i+3] over its half of the lanes.
    vf a[4], b[2];
    for (int i = 0; i < 4; ++i)  // per half: partial sums of x[2i], x[2i+1], x[2i], x[2i+1]
        a[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13)
             + __builtin_shufflevector(x[2 * i], x[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    for (int i = 0; i < 2; ++i)  // per half: partial sums of x[4i .. 4i+3]
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13)
             + __builtin_shufflevector(a[2 * i], a[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(b[0], b[1], 0, 1, 2, 3, 8, 9, 10, 11)
         + __builtin_shufflevector(b[0], b[1], 4, 5, 6, 7, 12, 13, 14, 15);
#else
    vf y[2];
    for (int i = 0; i < 2; ++i)  // lanes 0-1: 2 partial sums of x[2i]; lanes 2-3: of x[2i+1]
        y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 4, 5) + __builtin_shufflevector(x[2 * i], x[2 * i + 1], 2, 3, 6, 7);
    return __builtin_shufflevector(y[0], y[1], 0, 2, 4, 6) + __builtin_shufflevector(y[0], y[1], 1, 3, 5, 7);
#endif
}

// A stretch of 2 * kLanes elements of a K/V row as two float vectors. bf16 rows: the even and the odd elements,
// a shift and a mask of 32-bit words with no widening shuffle; float and int8 rows: the first and second half.
// Queries and outputs are arranged the same way, which a dot product does not notice.
struct Pair {
    vf a, b;
};

inline Pair load_pair(const uint16_t* p, int n) {  // n <= 2 * kLanes elements; the rest read as 0
    vu u = {};
    if (n == 2 * kLanes) __builtin_memcpy(&u, p, kVecBytes);
    else __builtin_memcpy(&u, p, n * 2);
    const vu even = u << 16, odd = u & 0xffff0000u;
    Pair r;
    __builtin_memcpy(&r.a, &even, kVecBytes);
    __builtin_memcpy(&r.b, &odd, kVecBytes);
    return r;
}

inline Pair load_pair(const float* p, int n) {
    if (n == 2 * kLanes) return {vload(p), vload(p + kLanes)};
    return {vload(p, n < kLanes ? n : kLanes), n > kLanes ? vload(p + kLanes, n - kLanes) : vf{}};
}

// kLanes int8 as int32 lanes (sign-extended); written per level, as the compiler splits
// __builtin_convertvector from narrow integers into scalar moves.
inline vi widen8(const int8_t* p) {
    vi r;
#if IRONLM_LANES == 16
    const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    __builtin_memcpy(&r, &w, 64);
#elif IRONLM_LANES == 8
    const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    __builtin_memcpy(&r, &w, 32);
#else
    for (int i = 0; i < kLanes; ++i) r[i] = p[i];
#endif
    return r;
}

// int8 rows: the two halves of 2 * kLanes elements as floats, one sign-extending widen and one convert each.
inline Pair load_pair(const int8_t* p, int n) {
    alignas(32) int8_t tail[2 * kLanes] = {};
    if (n < 2 * kLanes) {
        __builtin_memcpy(tail, p, n);
        p = tail;
    }
    return {__builtin_convertvector(widen8(p), vf), __builtin_convertvector(widen8(p + kLanes), vf)};
}

template <typename KV>
inline Pair arrange(const float* x) {  // 2 * kLanes floats in KV's order: even/odd for bf16, halves for float and int8
    if constexpr (sizeof(KV) == 2) {
        Pair r;
        for (int i = 0; i < kLanes; ++i) r.a[i] = x[2 * i], r.b[i] = x[2 * i + 1];
        return r;
    } else {
        return {vload(x), vload(x + kLanes)};
    }
}

template <typename KV>
inline void unarrange(const Pair& p, float* x) {
    if constexpr (sizeof(KV) == 2) {
        for (int i = 0; i < kLanes; ++i) x[2 * i] = p.a[i], x[2 * i + 1] = p.b[i];
    } else {
        vstore(x, p.a);
        vstore(x + kLanes, p.b);
    }
}

// The scales of n <= kLanes int8 rows at scale indices idx[0..n): one load when they sit side by side (tokens of
// one block), else one at a time.
inline vf scales_of(const float* base, const int64_t* idx, int n) {
    if (idx[n - 1] == idx[0] + n - 1) return vload(base + idx[0], n);
    vf s = {};
    for (int j = 0; j < n; ++j) s[j] = base[idx[j]];
    return s;
}

// Where a stretch's partial result for one query head goes: the unnormalised output (head_dim rounded
// up to a whole chunk of 2 * kLanes, in order), then the max score (in log2 units) and the sum of exponentials.
struct Partials {
    float* data;
    int64_t per_head;
    float* head(int64_t task, int64_t heads, int64_t h) const { return data + (task * heads + h) * per_head; }
};

// Chunks of the output a V slab holds: two registers of sums per chunk and head, with four registers left for
// the V chunk, its weight and the compiler. Spilling a few sums costs less than reading V again, and one query
// head a pass is bound by memory, not by the stores of spilled sums, so those take their whole rows in one slab.
// Measured on AVX2 (benchmarks/ab_kernels.py): 3 heads of 64 (24 sums) 1.03-1.08x and 1 head of 128 1.05-1.09x
// faster in one slab than in slabs; 4 heads of 128 (64 sums) 1.2-1.4x and 4 heads of 64 (32 sums) 1.07-1.18x
// faster in slabs than in one.
constexpr int slab_chunks(int g, int nc2) {
    if (g == 1 || 2 * g * nc2 <= kVecRegs * 3 / 2) return nc2;
    const int s = (kVecRegs - 4) / 2 / g;  // below nc2: the test above took every group whose row fits
    return s < 1 ? 1 : s;
}

// One pass: G query heads (qf: G rows of NC2 chunks of 2 * kLanes floats, scaled, zero past head_dim) that read kv head
// kvh, over n_tok tokens at `rows`; next_kvh is the kv head of the task's next pass (-1: none, or this one).
// G and NC2 are constants so that queries and accumulators stay in registers. scores: G rows of `stride`
// floats. Head g's result goes to out[g]; l2: prefetch into L2 (prefetch_into_l2).
template <typename KV, int NC2, int G, bool Full>
void attend_pass(const AttentionArgs& a, const int64_t* rows, int64_t n_tok, int64_t kvh, int64_t next_kvh,
                 const float* qf, float* scores, int64_t stride, float* const* out, bool l2) {
    // int8 rows carry a scale each: a token's score is scaled after its dot product, and its V row's scale goes
    // into its softmax weight once the sum is taken. rows[n_tok + t] is token t's scale index for kv head 0.
    constexpr bool kScaled = sizeof(KV) == 1;
    const float* k_scale = kScaled ? a.k_scale + kvh * a.block_size : nullptr;
    const float* v_scale = kScaled ? a.v_scale + kvh * a.block_size : nullptr;
    const int64_t* scale_rows = rows + n_tok;
    const KV* k_base = static_cast<const KV*>(a.k_cache) + kvh * a.block_size * a.head_dim;
    const KV* v_base = static_cast<const KV*>(a.v_cache) + kvh * a.block_size * a.head_dim;
    const int64_t row_bytes = a.head_dim * static_cast<int64_t>(sizeof(KV));
    constexpr int64_t kRowBytes = NC2 * 2 * kLanes * static_cast<int64_t>(sizeof(KV));
    const int64_t ahead = kPrefetchBytes / row_bytes > 8 ? kPrefetchBytes / row_bytes : 8;  // tokens
    // Elements in the final chunk; Full (head_dim a multiple of 2 * kLanes) makes every load a whole vector.
    const int last = Full ? 2 * kLanes : static_cast<int>(a.head_dim - (NC2 - 1) * 2 * kLanes);
    // The loops below prefetch `ahead` tokens ahead; the first rows of K and V are requested here.
    for (int64_t t = 0; t < n_tok && t < ahead; ++t) {
        prefetch_span(k_base + rows[t], row_bytes, l2);
        prefetch_span(v_base + rows[t], row_bytes, l2);
    }
    Pair q[G][NC2];
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < NC2; ++c) q[g][c] = arrange<KV>(qf + (g * NC2 + c) * 2 * kLanes);
    vf mx[G];
    for (int g = 0; g < G; ++g) mx[g] = splat(-3.0e38f);
    alignas(64) vf dots[G][kLanes];
    for (int64_t t0 = 0; t0 < n_tok; t0 += kLanes) {
        const int n = n_tok - t0 < kLanes ? static_cast<int>(n_tok - t0) : kLanes;
        for (int j = 0; j < n; ++j) {
            const int64_t t = t0 + j;
            if (t + ahead < n_tok) prefetch_row<kRowBytes>(k_base + rows[t + ahead], l2);
            // Chunk by chunk, each head's sums of the even and the odd lanes apart: 2 G sums and one chunk in
            // registers, and two dependency chains a head, whatever G and head_dim.
            vf da[G], db[G];
            for (int g = 0; g < G; ++g) da[g] = vf{}, db[g] = vf{};
            for (int c = 0; c < NC2; ++c) {
                const Pair k = load_pair(k_base + rows[t] + c * 2 * kLanes, c == NC2 - 1 ? last : 2 * kLanes);
                for (int g = 0; g < G; ++g) da[g] += q[g][c].a * k.a, db[g] += q[g][c].b * k.b;
            }
            for (int g = 0; g < G; ++g) dots[g][j] = da[g] + db[g];
        }
        vf ks = {};
        if constexpr (kScaled) ks = scales_of(k_scale, scale_rows + t0, n);
        for (int g = 0; g < G; ++g) {
            for (int j = n; j < kLanes; ++j) dots[g][j] = vf{};
            vf sc = hsum_lanes(dots[g]);
            if constexpr (kScaled) sc *= ks;
            vstore(scores + g * stride + t0, sc);
            for (int j = n; j < kLanes; ++j) sc[j] = -3.0e38f;  // past the stretch: not part of the max
            mx[g] = sc > mx[g] ? sc : mx[g];
        }
    }
    for (int g = 0; g < G; ++g) {
        float* sg = scores + g * stride;
        const float m = hmax(mx[g]);
        vf sum = {};
        for (int64_t t = 0; t < n_tok; t += kLanes) {
            const int n = n_tok - t < kLanes ? static_cast<int>(n_tok - t) : kLanes;
            vf e = vexp2_weight(vload(sg + t, n) - m);  // scores are in log2 units (the query took log2(e))
            for (int i = n; i < kLanes; ++i) e[i] = 0.0f;
            sum += e;
            if constexpr (kScaled) e *= scales_of(v_scale, scale_rows + t, n);  // V rows' scales, in the weights
            vstore(sg + t, e, n);
        }
        out[g][NC2 * 2 * kLanes] = m;
        out[g][NC2 * 2 * kLanes + 1] = hsum(sum);
    }
    // The next pass reads the same tokens of kv head next_kvh (if any): its first rows are requested during
    // this pass's last ones, so it does not start by waiting on memory.
    const int64_t next = next_kvh < 0 ? 0 : (next_kvh - kvh) * a.block_size * a.head_dim;
    const int64_t handover = n_tok > ahead ? n_tok - ahead : 0;
    // The output in slabs of S chunks, so that the G x S accumulators stay in registers: G heads' whole rows
    // of sums do not fit (GQA groups, head_dim 128), and updating sums kept in memory made every token a
    // store per chunk and head. Later slabs read the stretch's V rows again, from cache; the first one
    // streams them and prefetches, the last one hands over to the next pass.
    constexpr int S = slab_chunks(G, NC2);
    for (int c0 = 0; c0 < NC2; c0 += S) {
        Pair acc[G][S];
        for (int g = 0; g < G; ++g)
            for (int s = 0; s < S; ++s) acc[g][s] = Pair{};
        for (int64_t t = 0; t < n_tok; ++t) {
            if (c0 == 0 && t + ahead < n_tok) prefetch_row<kRowBytes>(v_base + rows[t + ahead], l2);
            if (c0 + S >= NC2 && next_kvh >= 0 && t >= handover) {
                prefetch_row<kRowBytes>(k_base + next + rows[t - handover], l2);
                prefetch_row<kRowBytes>(v_base + next + rows[t - handover], l2);
            }
            for (int s = 0; s < S && c0 + s < NC2; ++s) {
                const int c = c0 + s;
                const Pair v = load_pair(v_base + rows[t] + c * 2 * kLanes, c == NC2 - 1 ? last : 2 * kLanes);
                for (int g = 0; g < G; ++g) {
                    const float p = scores[g * stride + t];
                    acc[g][s].a += p * v.a, acc[g][s].b += p * v.b;
                }
            }
        }
        for (int g = 0; g < G; ++g)
            for (int s = 0; s < S && c0 + s < NC2; ++s) unarrange<KV>(acc[g][s], out[g] + (c0 + s) * 2 * kLanes);
    }
}

constexpr int kMaxChunks = 256 / (2 * kLanes);  // chunks of 2 * kLanes elements per head: head_dim <= 256

// Query heads per pass for NC2 chunks per head: up to 512 query floats a pass (4 heads of 128), whatever the
// vector width. Each K and V row is then widened once per group rather than once per query head: 1.14-1.15x on
// 16 sequences of the 135M shape against one head a pass, and 1.1x on Llama-3-8B's 4 heads of 128 against 2
// (benchmarks/ab_kernels.py). The queries that do not fit in registers are read from L1 by the K loop; the sums
// stay in registers (the K loop keeps two a head, the V loop a slab).
constexpr int kMaxHeadsPerPass = 4;
constexpr int kPassQueryFloats = 512;
constexpr int heads_per_pass(int nc2) {
    const int heads = kPassQueryFloats / (nc2 * 2 * kLanes);
    return heads < 1 ? 1 : heads > kMaxHeadsPerPass ? kMaxHeadsPerPass : heads;
}

template <typename KV, int NC2, int G>
void pass_dispatch_g(int g, const AttentionArgs& a, const int64_t* rows, int64_t n_tok, int64_t kvh, int64_t next_kvh,
                     const float* qf, float* scores, int64_t stride, float* const* out, bool l2) {
    if constexpr (G > 1) {
        if (g < G) return pass_dispatch_g<KV, NC2, G - 1>(g, a, rows, n_tok, kvh, next_kvh, qf, scores, stride, out, l2);
    }
    if (a.head_dim == NC2 * 2 * kLanes)
        attend_pass<KV, NC2, G, true>(a, rows, n_tok, kvh, next_kvh, qf, scores, stride, out, l2);
    else
        attend_pass<KV, NC2, G, false>(a, rows, n_tok, kvh, next_kvh, qf, scores, stride, out, l2);
}

template <typename KV, int NC2>
void pass_dispatch(int nc2, int g, const AttentionArgs& a, const int64_t* rows, int64_t n_tok, int64_t kvh,
                   int64_t next_kvh, const float* qf, float* scores, int64_t stride, float* const* out, bool l2) {
    if constexpr (NC2 < kMaxChunks) {
        if (nc2 > NC2) return pass_dispatch<KV, NC2 + 1>(nc2, g, a, rows, n_tok, kvh, next_kvh, qf, scores, stride, out, l2);
    }
    pass_dispatch_g<KV, NC2, heads_per_pass(NC2)>(g, a, rows, n_tok, kvh, next_kvh, qf, scores, stride, out, l2);
}

// head_dim rounded up to whole chunks: the length of a partial output.
inline int64_t padded_dim(int64_t head_dim) { return round_up(head_dim, 2 * kLanes); }

// The split of every sequence into stretches: task i covers tokens [start, start + len) of seq, and
// sequence b's tasks are first[b] .. first[b + 1] - 1.
struct Stretches {
    const AttentionArgs* a;
    int64_t* first;   // (B + 1)
    int64_t* seq;     // (tasks)
    int64_t* start;   // (tasks)
    int64_t* len;     // (tasks)
    Partials part;
    bool l2;          // prefetch into L2 (prefetch_into_l2)
};

void attention_tasks(void* ctx, int64_t begin, int64_t end) {
    const Stretches& s = *static_cast<const Stretches*>(ctx);
    const AttentionArgs& a = *s.a;
    const int64_t d = a.head_dim, group = a.heads / a.kv_heads;
    const int nc2 = static_cast<int>(padded_dim(d) / (2 * kLanes));
    const int64_t per_pass = heads_per_pass(nc2) < group ? heads_per_pass(nc2) : group;
    // Scores in log2 units: the softmax takes 2^x, fewer steps than e^x (vexp2_weight).
    const float score_scale = a.scale * kLog2e;
    alignas(64) float qf[kMaxHeadsPerPass * kMaxChunks * 2 * kLanes];
    alignas(64) float sink[kMaxChunks * 2 * kLanes + 2];  // results of the padding heads of a pass
    for (int64_t task = begin; task < end; ++task) {
        const int64_t b = s.seq[task], n_tok = s.len[task];
        const int64_t stride = round_up(n_tok, kLanes);
        // scores (per_pass rows of stride floats), then the token row offsets
        float* scores = static_cast<float*>(scratch_alloc((per_pass * stride + kLanes) * 4 + 2 * n_tok * 8));
        int64_t* rows = reinterpret_cast<int64_t*>(scores + per_pass * stride + kLanes);
        token_rows(a, a.block_tables + b * a.max_blocks, s.start[task], n_tok, rows, d);
        if (a.kv_type == DType::i8)  // scale indices (rows counted in rows, not elements) follow the row offsets
            token_rows(a, a.block_tables + b * a.max_blocks, s.start[task], n_tok, rows + n_tok, 1);
        for (int64_t kvh = 0; kvh < a.kv_heads; ++kvh) {
            for (int64_t g0 = 0; g0 < group; g0 += per_pass) {
                float* out[kMaxHeadsPerPass];
                for (int64_t g = 0; g < per_pass; ++g) {
                    const int64_t h = kvh * group + g0 + g;
                    float* qg = qf + g * nc2 * 2 * kLanes;
                    if (g0 + g >= group) {  // padding head: zero query, result discarded
                        for (int64_t i = 0; i < nc2 * 2 * kLanes; i += kLanes) vstore(qg + i, vf{});
                        out[g] = sink;
                        continue;
                    }
                    out[g] = s.part.head(task, a.heads, h);
                    const void* q = row_ptr(a.q, a.q_type, b * a.q_stride_b + h * a.q_stride_h);
                    for (int64_t i = 0; i < nc2 * 2 * kLanes; i += kLanes) {
                        const int n = d - i >= kLanes ? kLanes : d - i > 0 ? static_cast<int>(d - i) : 0;
                        vstore(qg + i, n ? load_any(q, a.q_type, i, n) * score_scale : vf{});
                    }
                }
                const int64_t next_kvh = g0 + per_pass < group || kvh + 1 == a.kv_heads ? -1 : kvh + 1;
                if (a.kv_type == DType::bf16)
                    pass_dispatch<uint16_t, 1>(nc2, static_cast<int>(per_pass), a, rows, n_tok, kvh, next_kvh, qf, scores, stride,
                                               out, s.l2);
                else if (a.kv_type == DType::i8)
                    pass_dispatch<int8_t, 1>(nc2, static_cast<int>(per_pass), a, rows, n_tok, kvh, next_kvh, qf, scores, stride,
                                             out, s.l2);
                else
                    pass_dispatch<float, 1>(nc2, static_cast<int>(per_pass), a, rows, n_tok, kvh, next_kvh, qf, scores, stride,
                                            out, s.l2);
            }
        }
        scratch_free(scores);
    }
}

// out[b, h] = sum over the stretches of exp(max_i - M) * out_i / sum over them of exp(max_i - M) * sum_i,
// M the largest max.
void merge_stretches(void* ctx, int64_t begin, int64_t end) {
    const Stretches& s = *static_cast<const Stretches*>(ctx);
    const AttentionArgs& a = *s.a;
    const int64_t d = a.head_dim, dp = padded_dim(d);
    for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / a.heads, h = i % a.heads;
        float m = -3.0e38f;
        for (int64_t t = s.first[b]; t < s.first[b + 1]; ++t) {
            const float mt = s.part.head(t, a.heads, h)[dp];
            m = mt > m ? mt : m;
        }
        float total = 0.0f;
        alignas(64) float o[kMaxChunks * 2 * kLanes] = {};
        for (int64_t t = s.first[b]; t < s.first[b + 1]; ++t) {
            const float* p = s.part.head(t, a.heads, h);
            const float w = __builtin_exp2f(p[dp] - m);  // maxima in log2 units
            total += p[dp + 1] * w;
            for (int64_t c = 0; c < d; c += kLanes) vstore(o + c, vload(o + c) + vload(p + c) * w);
        }
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        for (int64_t c = 0; c < d; c += kLanes) {
            const int n = d - c < kLanes ? static_cast<int>(d - c) : kLanes;
            store_any(a.out, a.o_type, (b * a.heads + h) * d + c, vload(o + c) * inv, n);
        }
    }
}

// When a kv head's query heads take several passes over a stretch (their queries outgrow the registers), each
// pass reads the stretch's K and V rows again, and so does each V slab: stretches stay short enough for those
// rows to stay in L2.
constexpr int64_t kPassBytes = 256 << 10;

// Tokens per stretch for a sequence of len tokens, `wanted` stretches per sequence, at most `cap`.
inline int64_t stretch_tokens(int64_t len, int64_t wanted, int64_t cap) {
    int64_t per = round_up((len + wanted - 1) / wanted, kLanes);
    per = per > cap ? cap : per;
    return per < kMinStretch ? kMinStretch : per;
}

void attention(const AttentionArgs& a) {
    if (a.batch == 0) return;
    // Enough stretches to give every thread a few tasks; an empty context still gets one (it outputs zeros).
    const int64_t wanted = (4 * static_cast<int64_t>(num_threads()) + a.batch - 1) / a.batch;
    const int nc2 = static_cast<int>(padded_dim(a.head_dim) / (2 * kLanes));
    const int64_t group = a.heads / a.kv_heads, per_pass = heads_per_pass(nc2);
    const bool rereads = group > per_pass || slab_chunks(static_cast<int>(group < per_pass ? group : per_pass), nc2) < nc2;
    const int64_t row_bytes = a.head_dim * (a.kv_type == DType::f32 ? 4 : a.kv_type == DType::bf16 ? 2 : 1);
    const int64_t cap = rereads ? round_up(kPassBytes / (2 * row_bytes), kLanes) : INT64_MAX;
    int64_t* first = static_cast<int64_t*>(scratch_alloc((a.batch + 1) * 8));
    first[0] = 0;
    for (int64_t b = 0; b < a.batch; ++b) {
        const int64_t len = a.context_lens[b], per = stretch_tokens(len, wanted, cap);
        first[b + 1] = first[b] + (len > 0 ? (len + per - 1) / per : 1);
    }
    const int64_t tasks = first[a.batch], dp = padded_dim(a.head_dim);
    void* scratch = scratch_alloc(tasks * 3 * 8 + tasks * a.heads * (dp + 2) * 4);
    int64_t* per_task = static_cast<int64_t*>(scratch);
    Stretches s{&a, first, per_task, per_task + tasks, per_task + 2 * tasks,
                Partials{reinterpret_cast<float*>(per_task + 3 * tasks), dp + 2}, prefetch_into_l2()};
    for (int64_t b = 0; b < a.batch; ++b) {
        const int64_t len = a.context_lens[b], per = stretch_tokens(len, wanted, cap);
        for (int64_t t = first[b], start = 0; t < first[b + 1]; ++t, start += per) {
            s.seq[t] = b;
            s.start[t] = start;
            s.len[t] = len - start < per ? len - start : per;
        }
    }
    parallel_for(tasks, attention_tasks, &s);
    if (a.batch * a.heads >= 64) parallel_for(a.batch * a.heads, merge_stretches, &s);
    else merge_stretches(&s, 0, a.batch * a.heads);
    scratch_free(scratch);
    scratch_free(first);
}
