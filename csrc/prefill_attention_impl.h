// Causal attention of a prompt chunk over its sequence's whole context (prefill), flash style.
// Included by ops_impl.h (inside its anonymous namespace) after the vector helpers.
//
// The call works through the kv heads in slices small enough for the cache. For each slice it copies K into
// (slice, Cp / W, Dp, W) floats (each group of W = kLanes keys transposed), V into (slice, Cp, Dp) and the
// slice's query heads into (L, heads, Dp) floats times the scale and log2(e) (Dp: head_dim and Cp: context
// rounded up to a key block, the padding zero), so the scores come out in log2 units and the softmax takes 2^x,
// which costs fewer steps than e^x. A task is 24 query rows of one head. It goes over key blocks of 4 W keys (64
// with AVX-512, 32 with AVX2), and on each block its rows take turns R = kPrefillRows at a time: the R x 4W
// scores come from broadcasting q[d] against element d of 4 groups of W keys (4R accumulators), an online
// softmax keeps each row's running max and sum, and P V adds the block's keys into the rows' Dp outputs, which
// stay in L1 with the block.
//
// With AVX512-BF16 and a bf16 q (a bf16 model) the same runs on bf16 pairs with vdpbf16ps, two products per
// lane: K as (slice, Cp / 16, Dp / 2, 16, 2) (a group's keys side by side for each pair of dims), V as
// (slice, Cp / 2, Dp, 2) (pairs of keys side by side for each dim), q unscaled (the scores are scaled
// instead, so q stays exact) and the probabilities rounded to bf16 for P V. int8 rows go in as their integers
// (exact in bf16) and their scales multiply the scores and the probabilities. The softmax stays in float32.

// Query rows per register tile: 4 accumulators a row, and a quarter of the registers left for the keys.
constexpr int64_t kPrefillRows = kVecRegs == 32 ? 6 : 3;
constexpr int64_t kPrefillTaskRows = 24;  // query rows per task
constexpr int64_t kKeyBlock = 4 * kLanes; // keys per block; also the padding unit of Dp and Cp
constexpr int64_t kMaxPrefillDim = 256;
constexpr float kSlack = 12.0f;           // how far scores (log2 units) may pass a row's reference max unrescaled

struct PrefillCtx {
    const PrefillAttentionArgs* a;
    int64_t dp, cp, q_blocks;
    int64_t group;   // query heads per kv head
    float score_scale;  // what turns q . k into a score in log2 units: the attention scale times log2(e)
    int64_t kvh0, kvh_n;  // the slice of kv heads being worked on: [kvh0, kvh0 + kvh_n)
    float* qs;  // (L, kvh_n * group, Dp), the slice's query heads, scaled
    float* kt;  // (kvh_n, Cp / W, Dp, W)
    float* vs;  // (kvh_n, Cp, Dp)
    // the bf16 layouts instead (see the top): q unscaled
    uint16_t* qs16;  // (L, kvh_n * group, Dp)
    uint16_t* kt16;  // (kvh_n, Cp / 16, Dp / 2, 16, 2)
    uint16_t* vs16;  // (kvh_n, Cp / 2, Dp, 2)
    float* k_scales;  // (kvh_n, Cp): an int8 pool's row scales, for the bf16 layouts; null otherwise
    float* v_scales;
};

// Elements [i, i + n) of a K or V row as floats; i8 rows still need their scale.
inline vf load_kv(const void* p, DType t, int64_t i, int n) {
    if (t != DType::i8) return load_any(p, t, i, n);
    const int8_t* src = static_cast<const int8_t*>(p) + i;
    alignas(16) int8_t tail[kLanes] = {};
    if (n < kLanes) {
        __builtin_memcpy(tail, src, n);
        src = tail;
    }
    return __builtin_convertvector(widen8(src), vf);
}

template <bool kBf16>
void prefill_pack_kv(void* ctx, int64_t begin, int64_t end) {  // over groups of W keys, padding included
    const PrefillCtx& c = *static_cast<const PrefillCtx*>(ctx);
    const PrefillAttentionArgs& a = *c.a;
    const int64_t dp = c.dp;
    alignas(64) float row[kMaxPrefillDim];
    alignas(64) uint16_t krow[kMaxPrefillDim], vrow[kMaxPrefillDim];
    // Group by group and head by head, so each transposed group is filled while its lines are in L1.
    for (int64_t g = begin; g < end; ++g) {
        for (int64_t s = 0; s < c.kvh_n; ++s) {
            const int64_t h = c.kvh0 + s;
            // The W keys of a group sit side by side for each d (each pair of d in bf16), in a 4 KB run
            // (2 KB in bf16) for head_dim 64 and W = 16.
            const int64_t group_at = s * dp * c.cp + g * dp * kLanes;
            for (int64_t t = g * kLanes; t < (g + 1) * kLanes; ++t) {
                // where key t's K and V rows start, and their scales (int8 pools only)
                int64_t k_at = t * a.k_stride_t + h * a.k_stride_h, v_at = t * a.v_stride_t + h * a.v_stride_h;
                float ks = 1.0f, vs = 1.0f;
                if (a.block_table && t < a.context) {
                    const int64_t r = (a.block_table[t / a.block_size] * a.kv_heads + h) * a.block_size + t % a.block_size;
                    k_at = v_at = r * a.head_dim;
                    if (a.k_scale) ks = a.k_scale[r], vs = a.v_scale[r];
                }
                if (kBf16 && c.k_scales) {  // the integers go in as they are, their scales apart
                    c.k_scales[s * c.cp + t] = t < a.context ? ks : 0.0f;
                    c.v_scales[s * c.cp + t] = t < a.context ? vs : 0.0f;
                    ks = vs = 1.0f;
                }
                for (int64_t i = 0; i < dp; i += kLanes) {
                    const int64_t left = t < a.context ? a.head_dim - i : 0;  // padding keys and dims are zero
                    const int n = left >= kLanes ? kLanes : static_cast<int>(left > 0 ? left : 0);
                    const vf kv = n ? load_kv(a.k, a.k_type, k_at + i, n) * ks : vf{};
                    const vf vv = n ? load_kv(a.v, a.v_type, v_at + i, n) * vs : vf{};
                    if constexpr (kBf16) {
                        vstore(krow + i, kv);
                        vstore(vrow + i, vv);
                    } else {
                        vstore(row + i, kv);
                        vstore(c.vs + (s * c.cp + t) * dp + i, vv);
                    }
                }
                if constexpr (kBf16) {
                    uint16_t* group = c.kt16 + group_at;
                    for (int64_t d = 0; d < dp; d += 2) __builtin_memcpy(group + (d * kLanes + 2 * (t % kLanes)), krow + d, 4);
                    uint16_t* pair = c.vs16 + (s * c.cp + (t & ~int64_t{1})) * dp + (t & 1);  // this key's side of its pair
                    for (int64_t d = 0; d < dp; ++d) pair[2 * d] = vrow[d];
                } else {
                    float* group = c.kt + group_at;
                    for (int64_t d = 0; d < dp; ++d) group[d * kLanes + t % kLanes] = row[d];
                }
            }
        }
    }
}

template <bool kBf16>
void prefill_pack_q(void* ctx, int64_t begin, int64_t end) {
    const PrefillCtx& c = *static_cast<const PrefillCtx*>(ctx);
    const PrefillAttentionArgs& a = *c.a;
    const int64_t nq = c.kvh_n * c.group, hq0 = c.kvh0 * c.group;
    for (int64_t t = begin; t < end; ++t)
        for (int64_t s = 0; s < nq; ++s) {
            const int64_t h = hq0 + s;
            for (int64_t i = 0; i < c.dp; i += kLanes) {
                const int n = a.head_dim - i >= kLanes ? kLanes : static_cast<int>(a.head_dim > i ? a.head_dim - i : 0);
                const vf q = n ? load_any(a.q, a.q_type, t * a.q_stride_t + h * a.q_stride_h + i, n) : vf{};
                if constexpr (kBf16) vstore(c.qs16 + (t * nq + s) * c.dp + i, q);
                else vstore(c.qs + (t * nq + s) * c.dp + i, q * c.score_scale);
            }
        }
}

// acc[i] += x * w[i] for the 4 vectors of one tile row: a score block (x = q[d], w = K^T row d) or an output
// block (x = p[j], w = V row j).
inline void add_scaled(vf (&acc)[4], float x, const vf (&w)[4]) {
    const vf xv = splat(x);
    for (int i = 0; i < 4; ++i) acc[i] += xv * w[i];
}

#ifdef __AVX512BF16__
// acc[i] += x[0] w[i][0] + x[1] w[i][1] over the 4 vectors of one tile row, each lane a bf16 pair: a score
// block (x = q[2d], q[2d + 1]; w = the pair of dims of 4 groups of keys) or an output block (x = p[j], p[j + 1];
// w = V rows j and j + 1 for 4 x 16 dims).
inline void add_pairs(vf (&acc)[4], const uint16_t* x, const __m512i (&w)[4]) {
    int32_t x2;
    __builtin_memcpy(&x2, x, 4);
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(x2);
    for (int i = 0; i < 4; ++i) acc[i] = (vf)_mm512_dpbf16_ps((__m512)acc[i], (__m512bh)w[i], xv);
}

inline __m512i load_pairs(const uint16_t* p) { return _mm512_loadu_si512(p); }
#endif

// One task's query rows of one head: each row's position, where its q starts, and its online softmax state
// (running max m, sum l kept as a vector of lane sums, output o). Slots past the task's rows are scratch for the
// rows a short tile repeats.
constexpr int64_t kTaskSlots = kPrefillTaskRows + kPrefillRows;
struct TaskRows {
    int64_t pos[kTaskSlots];  // the row sees keys [0, pos]
    int64_t q_at[kTaskSlots];
    int64_t kv_at, scales_at;  // the head's K and V in the slice, and its int8 rows' scales
    float m[kTaskSlots];
    vf l[kTaskSlots];
    alignas(64) float o[kTaskSlots * kMaxPrefillDim];  // (slots, Dp)
};

// Key block j0 for the rows in slots slot[0..kPrefillRows) of query head s (a short tile repeats its last row in
// scratch slots). kBf16: the bf16 layouts and vdpbf16ps (see the top).
template <bool kBf16>
void prefill_tile_block(const PrefillCtx& c, int64_t s, TaskRows& t, const int64_t (&slot)[kPrefillRows], int64_t j0) {
    const int64_t dp = c.dp;
    const int64_t kv_at = t.kv_at, scales_at = t.scales_at;
    const int64_t kv_end = t.pos[slot[kPrefillRows - 1]] + 1;
    alignas(64) float p[kPrefillRows][kKeyBlock];  // the scores, then the weights
    alignas(64) uint16_t p16[kPrefillRows][kKeyBlock];
    float* o[kPrefillRows];
    for (int r = 0; r < kPrefillRows; ++r) o[r] = t.o + slot[r] * dp;
    const vf lane = lane_index();
    // scores: p[r][W v + lane] = q[r] . K[j0 + W v + lane], in log2 units
    if constexpr (kBf16) {
#ifdef __AVX512BF16__
        vf sc[kPrefillRows][4] = {};
        const float scale = c.score_scale;
        const uint16_t* group = c.kt16 + kv_at + j0 * dp;  // 4 groups of 16 keys, dp x 16 bf16 each
        for (int64_t d = 0; d < dp; d += 2) {
            const uint16_t* kr = group + d * kLanes;
            const __m512i k[4] = {load_pairs(kr), load_pairs(kr + dp * kLanes), load_pairs(kr + 2 * dp * kLanes),
                                  load_pairs(kr + 3 * dp * kLanes)};
            for (int r = 0; r < kPrefillRows; ++r) add_pairs(sc[r], c.qs16 + t.q_at[slot[r]] + d, k);
        }
        vf to_score[4];  // what turns the products into scores: the scale, times each key's for int8 rows
        for (int v = 0; v < 4; ++v)
            to_score[v] = c.k_scales ? vload(c.k_scales + scales_at + j0 + kLanes * v) * scale : splat(scale);
        for (int r = 0; r < kPrefillRows; ++r)
            for (int v = 0; v < 4; ++v) vstore(p[r] + kLanes * v, sc[r][v] * to_score[v]);
#endif
    } else {
        vf sc[kPrefillRows][4] = {};
        const float* group = c.kt + kv_at + j0 * dp;  // 4 groups of W keys, dp x W floats each
        const float* q[kPrefillRows];
        for (int r = 0; r < kPrefillRows; ++r) q[r] = c.qs + t.q_at[slot[r]];
        for (int64_t d = 0; d < dp; ++d) {
            const float* kr = group + d * kLanes;
            const vf k[4] = {vload(kr), vload(kr + dp * kLanes), vload(kr + 2 * dp * kLanes),
                               vload(kr + 3 * dp * kLanes)};
            for (int r = 0; r < kPrefillRows; ++r) add_scaled(sc[r], q[r][d], k);
        }
        for (int r = 0; r < kPrefillRows; ++r)
            for (int v = 0; v < 4; ++v) vstore(p[r] + kLanes * v, sc[r][v]);
    }
    // Online softmax in base 2; keys past a row's position score -inf, so they weigh 0. A row's reference max
    // moves only when a block's max passes it by more than kSlack (2^(s - m) stays below 2^12), so most blocks
    // rescale nothing.
    for (int r = 0; r < kPrefillRows; ++r) {
        const int64_t pos = t.pos[slot[r]];
        float& m = t.m[slot[r]];
        vf& l = t.l[slot[r]];
        vf sc[4] = {vload(p[r]), vload(p[r] + kLanes), vload(p[r] + 2 * kLanes), vload(p[r] + 3 * kLanes)};
        if (j0 + kKeyBlock > pos + 1) {  // the block passes the row's position
            const vf limit = splat(static_cast<float>(pos - j0));  // exact: positions < 2^24
            for (int v = 0; v < 4; ++v)
                sc[v] = lane + static_cast<float>(kLanes * v) <= limit ? sc[v] : splat(-__builtin_inff());
        }
        const vf top01 = sc[0] > sc[1] ? sc[0] : sc[1], top23 = sc[2] > sc[3] ? sc[2] : sc[3];
        const float block_max = hmax(top01 > top23 ? top01 : top23);
        if (block_max > m + kSlack) {  // always for a row's first block, where m = -inf and l, o are 0
            const vf alpha = vexp2_weight(splat(m - block_max));
            l *= alpha;
            for (int64_t i = 0; i < dp; i += kLanes) vstore(o[r] + i, vload(o[r] + i) * alpha);
            m = block_max;
        }
        vf e[4];
        for (int v = 0; v < 4; ++v) {
            e[v] = vexp2_weight(sc[v] - m);
            if constexpr (kBf16) vstore(p16[r] + kLanes * v, c.v_scales ? e[v] * vload(c.v_scales + scales_at + j0 + kLanes * v) : e[v]);
            else vstore(p[r] + kLanes * v, e[v]);
        }
        l += (e[0] + e[1]) + (e[2] + e[3]);
    }
    // o += p V over the block's keys, 4 W output dims at a time
    const int64_t nk = kv_end - j0 < kKeyBlock ? kv_end - j0 : kKeyBlock;
    for (int64_t d0 = 0; d0 < dp; d0 += kKeyBlock) {
        vf acc[kPrefillRows][4];
        for (int r = 0; r < kPrefillRows; ++r)
            for (int v = 0; v < 4; ++v) acc[r][v] = vload(o[r] + d0 + kLanes * v);
        if constexpr (kBf16) {
#ifdef __AVX512BF16__
            // pairs of keys; past nk the probabilities are zero and V is zero padding up to Cp
            for (int64_t j = 0; j < nk; j += 2) {
                const uint16_t* vr = c.vs16 + kv_at + (j0 + j) * dp + 2 * d0;
                const __m512i v[4] = {load_pairs(vr), load_pairs(vr + 32), load_pairs(vr + 64), load_pairs(vr + 96)};
                for (int r = 0; r < kPrefillRows; ++r) add_pairs(acc[r], p16[r] + j, v);
            }
#endif
        } else {
            for (int64_t j = 0; j < nk; ++j) {
                const float* vr = c.vs + kv_at + (j0 + j) * dp + d0;
                const vf v[4] = {vload(vr), vload(vr + kLanes), vload(vr + 2 * kLanes), vload(vr + 3 * kLanes)};
                for (int r = 0; r < kPrefillRows; ++r) add_scaled(acc[r], p[r][j], v);
            }
        }
        for (int r = 0; r < kPrefillRows; ++r)
            for (int v = 0; v < 4; ++v) vstore(o[r] + d0 + kLanes * v, acc[r][v]);
    }
}

// Query rows [row_begin, row_end) (at most kPrefillTaskRows) of the slice's query head s. Key block by key block,
// each tile of kPrefillRows rows that sees the block takes its turn on it: the block's K and V come from L2 once
// a task and from L1 for the other tiles, where a tile running over all blocks alone read them from L2 every time.
template <bool kBf16>
void prefill_task(const PrefillCtx& c, int64_t s, int64_t row_begin, int64_t row_end) {
    const PrefillAttentionArgs& a = *c.a;
    const int64_t dp = c.dp, nq = c.kvh_n * c.group;
    const int64_t rows = row_end - row_begin;
    const int64_t tiles = (rows + kPrefillRows - 1) / kPrefillRows;
    TaskRows t;
    t.kv_at = s / c.group * dp * c.cp;
    t.scales_at = s / c.group * c.cp;
    for (int64_t i = 0; i < kTaskSlots; ++i) {
        const int64_t row = row_begin + (i < rows ? i : rows - 1);  // scratch slots repeat the last row
        t.q_at[i] = (row * nq + s) * dp;
        t.pos[i] = a.context - a.q_len + row;
        t.m[i] = -__builtin_inff();
        t.l[i] = vf{};
        for (int64_t j = 0; j < dp; j += kLanes) vstore(t.o + i * dp + j, vf{});
    }
    const int64_t kv_end = t.pos[rows - 1] + 1;
    for (int64_t j0 = 0; j0 < kv_end; j0 += kKeyBlock) {
        for (int64_t tile = 0; tile < tiles; ++tile) {
            int64_t slot[kPrefillRows];
            for (int r = 0; r < kPrefillRows; ++r) {
                const int64_t i = tile * kPrefillRows + r;
                slot[r] = i < rows ? i : kPrefillTaskRows + r;
            }
            if (j0 <= t.pos[slot[kPrefillRows - 1]]) prefill_tile_block<kBf16>(c, s, t, slot, j0);  // else it sees none
        }
    }
    for (int64_t i = 0; i < rows; ++i) {
        const float inv = 1.0f / hsum(t.l[i]);
        for (int64_t j = 0; j < a.head_dim; j += kLanes) {
            const int n = a.head_dim - j < kLanes ? static_cast<int>(a.head_dim - j) : kLanes;
            store_any(a.out, a.o_type, ((row_begin + i) * a.heads + c.kvh0 * c.group + s) * a.head_dim + j,
                      vload(t.o + i * dp + j) * inv, n);
        }
    }
}

template <bool kBf16>
void prefill_tasks(void* ctx, int64_t begin, int64_t end) {
    const PrefillCtx& c = *static_cast<const PrefillCtx*>(ctx);
    const PrefillAttentionArgs& a = *c.a;
    for (int64_t task = begin; task < end; ++task) {
        // Head by head, so a thread's tasks in a row share one head's K and V in its L2; within a head the
        // costliest rows (the last, which see the most keys) first, so the pool's threads finish together.
        const int64_t s = task / c.q_blocks, block = c.q_blocks - 1 - task % c.q_blocks;
        const int64_t row_end = (block + 1) * kPrefillTaskRows < a.q_len ? (block + 1) * kPrefillTaskRows : a.q_len;
        prefill_task<kBf16>(c, s, block * kPrefillTaskRows, row_end);
    }
}

// Packed K and V of one slice of kv heads stay under this, so they are still in cache when read (packing
// every head of a long context first would write tens of MB and read it back from DRAM).
constexpr int64_t kSliceBytes = 4 << 20;

template <bool kBf16>
void prefill_slices(PrefillCtx& c) {
    const PrefillAttentionArgs& a = *c.a;
    const int64_t elem = kBf16 ? 2 : 4;  // bytes per packed element
    // kv heads per slice: within the byte budget, but enough tasks to keep every thread busy
    const int64_t head_bytes = 2 * c.dp * c.cp * elem;
    const int64_t wanted_tasks = 4 * static_cast<int64_t>(num_threads());
    int64_t slice = kSliceBytes / head_bytes;
    if (slice * c.group * c.q_blocks < wanted_tasks) slice = (wanted_tasks + c.group * c.q_blocks - 1) / (c.group * c.q_blocks);
    slice = slice < 1 ? 1 : slice > a.kv_heads ? a.kv_heads : slice;
    const int64_t q_elems = a.q_len * slice * c.group * c.dp, kv_elems = slice * c.dp * c.cp;
    const int64_t scale_elems = kBf16 && a.k_scale ? slice * c.cp : 0;
    char* scratch = static_cast<char*>(scratch_alloc((q_elems + 2 * kv_elems) * elem + 2 * scale_elems * 4));
    if constexpr (kBf16) {
        c.qs16 = reinterpret_cast<uint16_t*>(scratch);
        c.kt16 = c.qs16 + q_elems;
        c.vs16 = c.kt16 + kv_elems;
        if (scale_elems) {
            c.k_scales = reinterpret_cast<float*>(c.vs16 + kv_elems);
            c.v_scales = c.k_scales + scale_elems;
        }
    } else {
        c.qs = reinterpret_cast<float*>(scratch);
        c.kt = c.qs + q_elems;
        c.vs = c.kt + kv_elems;
    }
    for (c.kvh0 = 0; c.kvh0 < a.kv_heads; c.kvh0 += slice) {
        c.kvh_n = a.kv_heads - c.kvh0 < slice ? a.kv_heads - c.kvh0 : slice;
        parallel_for(c.cp / kLanes, prefill_pack_kv<kBf16>, &c);
        parallel_for(a.q_len, prefill_pack_q<kBf16>, &c);
        parallel_for(c.q_blocks * c.kvh_n * c.group, prefill_tasks<kBf16>, &c);
    }
    scratch_free(scratch);
}

void prefill_attention(const PrefillAttentionArgs& a) {
    PrefillCtx c{&a, round_up(a.head_dim, kKeyBlock), round_up(a.context, kKeyBlock),
                 (a.q_len + kPrefillTaskRows - 1) / kPrefillTaskRows, a.heads / a.kv_heads, a.scale * kLog2e, 0, 0,
                 nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
#ifdef __AVX512BF16__
    if (a.q_type == DType::bf16) return prefill_slices<true>(c);  // a bf16 model: bf16 products are enough
#endif
    prefill_slices<false>(c);
}
