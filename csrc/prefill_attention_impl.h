// Causal attention of a prompt chunk over its sequence's whole context (prefill), flash style.
// Included by ops_impl.h (inside its anonymous namespace) after the vector helpers.
//
// The call first copies K into (KVH, Cp / 16, Dp, 16) floats (each group of 16 keys transposed), V into
// (KVH, Cp, Dp) and Q into (L, H, Dp) floats times the scale (Dp: head_dim rounded up to 64, Cp: context
// rounded up to 64, the padding zero). A task is 24 query rows of one head. Its rows go 6 at a time over
// key blocks of 64: the 6 x 64 scores come from broadcasting q[d] against element d of 4 groups of 16 keys
// (24 accumulators), an online softmax keeps each row's running max and sum, and P V adds the block's keys
// into a 6 x Dp output kept in L1.

constexpr int64_t kPrefillRows = 6;       // query rows per register tile
constexpr int64_t kPrefillTaskRows = 24;  // query rows per task
constexpr int64_t kKeyBlock = 64;         // keys per block; also the padding unit of Dp and Cp
constexpr int64_t kMaxPrefillDim = 256;
constexpr float kSlack = 8.0f;            // how far scores may pass a row's reference max unrescaled

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

struct PrefillCtx {
    const PrefillAttentionArgs* a;
    int64_t dp, cp, q_blocks;
    float* qs;  // (L, H, Dp), scaled
    float* kt;  // (KVH, Cp / 16, Dp, 16)
    float* vs;  // (KVH, Cp, Dp)
};

void prefill_pack_kv(void* ctx, int64_t begin, int64_t end) {  // over tokens, padding included
    const PrefillCtx& c = *static_cast<const PrefillCtx*>(ctx);
    const PrefillAttentionArgs& a = *c.a;
    alignas(64) float row[kMaxPrefillDim];
    for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < a.kv_heads; ++h) {
            for (int64_t i = 0; i < c.dp; i += kLanes) {
                const int64_t left = t < a.context ? a.head_dim - i : 0;  // padding keys and dims are zero
                const int n = left >= kLanes ? kLanes : static_cast<int>(left > 0 ? left : 0);
                store16(row + i, n ? load_any(a.k, a.k_type, t * a.k_stride_t + h * a.k_stride_h + i, n) : v16f{});
                store16(c.vs + (h * c.cp + t) * c.dp + i,
                        n ? load_any(a.v, a.v_type, t * a.v_stride_t + h * a.v_stride_h + i, n) : v16f{});
            }
            // The 16 keys of a group sit side by side for each d, in a 4 KB run (head_dim 64).
            float* group = c.kt + h * c.dp * c.cp + (t / kLanes) * c.dp * kLanes + t % kLanes;
            for (int64_t d = 0; d < c.dp; ++d) group[d * kLanes] = row[d];
        }
}

void prefill_pack_q(void* ctx, int64_t begin, int64_t end) {
    const PrefillCtx& c = *static_cast<const PrefillCtx*>(ctx);
    const PrefillAttentionArgs& a = *c.a;
    for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < a.heads; ++h) {
            float* dst = c.qs + (t * a.heads + h) * c.dp;
            for (int64_t i = 0; i < c.dp; i += kLanes) {
                const int n = a.head_dim - i >= kLanes ? kLanes : static_cast<int>(a.head_dim > i ? a.head_dim - i : 0);
                store16(dst + i, n ? load_any(a.q, a.q_type, t * a.q_stride_t + h * a.q_stride_h + i, n) * a.scale : v16f{});
            }
        }
}

// acc[i] += x * w[i] for the 4 vectors of one tile row: a score block (x = q[d], w = K^T row d) or an output
// block (x = p[j], w = V row j).
inline void add_scaled(v16f (&acc)[4], float x, const v16f (&w)[4]) {
    const v16f xv = splat(x);
    for (int i = 0; i < 4; ++i) acc[i] += xv * w[i];
}

// Query rows [r0, r0 + nr) of head h (nr <= kPrefillRows; a short tile repeats its last row and stores only nr).
void prefill_rows(const PrefillCtx& c, int64_t h, int64_t r0, int64_t nr) {
    const PrefillAttentionArgs& a = *c.a;
    const int64_t dp = c.dp, cp = c.cp, hk = h / (a.heads / a.kv_heads);
    const float* kt = c.kt + hk * dp * cp;
    const float* vs = c.vs + hk * cp * dp;
    const float* q[kPrefillRows];
    int64_t pos[kPrefillRows];  // each row's position: it sees keys [0, pos]
    for (int r = 0; r < kPrefillRows; ++r) {
        const int64_t row = r0 + (r < nr ? r : nr - 1);
        q[r] = c.qs + (row * a.heads + h) * dp;
        pos[r] = a.context - a.q_len + row;
    }
    const int64_t kv_end = pos[kPrefillRows - 1] + 1;
    alignas(64) float o[kPrefillRows][kMaxPrefillDim];
    alignas(64) float p[kPrefillRows][kKeyBlock];
    float m[kPrefillRows], l[kPrefillRows];
    for (int r = 0; r < kPrefillRows; ++r) {
        m[r] = -__builtin_inff();
        l[r] = 0.0f;
        for (int64_t i = 0; i < dp; i += kLanes) store16(o[r] + i, v16f{});
    }
    v16f lane;
    for (int i = 0; i < kLanes; ++i) lane[i] = static_cast<float>(i);
    for (int64_t j0 = 0; j0 < kv_end; j0 += kKeyBlock) {
        // scores: s[r][v] = q[r] . K[j0 + 16 v + lane]
        v16f s[kPrefillRows][4] = {};
        const float* group = kt + j0 * dp;  // 4 groups of 16 keys, dp x 16 floats each
        for (int64_t d = 0; d < dp; ++d) {
            const float* kr = group + d * kLanes;
            const v16f k[4] = {load16(kr), load16(kr + dp * kLanes), load16(kr + 2 * dp * kLanes),
                               load16(kr + 3 * dp * kLanes)};
            for (int r = 0; r < kPrefillRows; ++r) add_scaled(s[r], q[r][d], k);
        }
        // Online softmax; keys past a row's position weigh nothing. A row's reference max moves only when a
        // block's max passes it by more than kSlack (e^(s - m) stays below e^8), so most blocks rescale nothing.
        for (int r = 0; r < kPrefillRows; ++r) {
            const bool partial = j0 + kKeyBlock > pos[r] + 1;
            const v16f limit = splat(static_cast<float>(pos[r] - j0));  // exact: positions < 2^24
            v16f top = splat(-__builtin_inff());
            for (int v = 0; v < 4; ++v) {
                if (partial) s[r][v] = lane + static_cast<float>(16 * v) <= limit ? s[r][v] : splat(-__builtin_inff());
                top = s[r][v] > top ? s[r][v] : top;
            }
            const float block_max = hmax(top);
            if (block_max > m[r] + kSlack) {  // always for the first block, where m = -inf
                if (l[r] > 0.0f) {
                    const float alpha = vexp(splat(m[r] - block_max))[0];
                    l[r] *= alpha;
                    for (int64_t i = 0; i < dp; i += kLanes) store16(o[r] + i, load16(o[r] + i) * alpha);
                }
                m[r] = block_max;
            }
            v16f sum = {};
            for (int v = 0; v < 4; ++v) {
                v16f e = vexp(s[r][v] - m[r]);
                if (partial) e = lane + static_cast<float>(16 * v) <= limit ? e : v16f{};
                store16(p[r] + 16 * v, e);
                sum += e;
            }
            l[r] += hsum(sum);
        }
        // o += p V over the block's keys, 64 output dims at a time
        const int64_t nk = kv_end - j0 < kKeyBlock ? kv_end - j0 : kKeyBlock;
        for (int64_t d0 = 0; d0 < dp; d0 += kKeyBlock) {
            v16f acc[kPrefillRows][4];
            for (int r = 0; r < kPrefillRows; ++r)
                for (int v = 0; v < 4; ++v) acc[r][v] = load16(o[r] + d0 + 16 * v);
            for (int64_t j = 0; j < nk; ++j) {
                const float* vr = vs + (j0 + j) * dp + d0;
                const v16f v[4] = {load16(vr), load16(vr + 16), load16(vr + 32), load16(vr + 48)};
                for (int r = 0; r < kPrefillRows; ++r) add_scaled(acc[r], p[r][j], v);
            }
            for (int r = 0; r < kPrefillRows; ++r)
                for (int v = 0; v < 4; ++v) store16(o[r] + d0 + 16 * v, acc[r][v]);
        }
    }
    for (int r = 0; r < nr; ++r) {
        const float inv = 1.0f / l[r];
        for (int64_t i = 0; i < a.head_dim; i += kLanes) {
            const int n = a.head_dim - i < kLanes ? static_cast<int>(a.head_dim - i) : kLanes;
            store_any(a.out, a.o_type, ((r0 + r) * a.heads + h) * a.head_dim + i, load16(o[r] + i) * inv, n);
        }
    }
}

void prefill_tasks(void* ctx, int64_t begin, int64_t end) {
    const PrefillCtx& c = *static_cast<const PrefillCtx*>(ctx);
    const PrefillAttentionArgs& a = *c.a;
    for (int64_t task = begin; task < end; ++task) {
        // The costliest rows (the last, which see the most keys) first, so the pool's threads finish together.
        const int64_t block = c.q_blocks - 1 - task / a.heads, h = task % a.heads;
        const int64_t row_end = (block + 1) * kPrefillTaskRows < a.q_len ? (block + 1) * kPrefillTaskRows : a.q_len;
        for (int64_t r0 = block * kPrefillTaskRows; r0 < row_end; r0 += kPrefillRows)
            prefill_rows(c, h, r0, row_end - r0 < kPrefillRows ? row_end - r0 : kPrefillRows);
    }
}

void prefill_attention(const PrefillAttentionArgs& a) {
    PrefillCtx c{&a, round_up(a.head_dim, kKeyBlock), round_up(a.context, kKeyBlock),
                 (a.q_len + kPrefillTaskRows - 1) / kPrefillTaskRows, nullptr, nullptr, nullptr};
    const int64_t q_floats = a.q_len * a.heads * c.dp, kv_floats = a.kv_heads * c.dp * c.cp;
    float* scratch = static_cast<float*>(scratch_alloc((q_floats + 2 * kv_floats) * sizeof(float)));
    c.qs = scratch;
    c.kt = scratch + q_floats;
    c.vs = scratch + q_floats + kv_floats;
    parallel_for(c.cp, prefill_pack_kv, &c);
    parallel_for(a.q_len, prefill_pack_q, &c);
    parallel_for(c.q_blocks * a.heads, prefill_tasks, &c);
    scratch_free(scratch);
}
