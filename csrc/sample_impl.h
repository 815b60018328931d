// One sampled token per row of logits: temperature, top-k, min-p, top-p, then an inverse-CDF draw; and the
// repetition penalty that may come before. Included by ops_impl.h (inside its anonymous namespace) after the
// vector helpers.
//
// A row's weights are w = exp(max((logit - max) / T, -87)), so its likeliest token weighs 1 and exp stays out of
// the subnormals (x86 takes a slow path through those, and a weight under e^-87 beside 1 is never drawn). A -inf
// or NaN logit weighs 0. top-k keeps the weights at least the k-th largest (ties kept) and min-p those at least
// min_p; the rest weigh 0. top-p then keeps the fewest heaviest tokens whose weight reaches top_p of the row's
// total (the heaviest always stays; among equal weights the lower ids first). The draw walks the kept tokens in
// vocabulary order and picks the first whose running weight passes u times their total.
//
// Neither cut sorts the row. It gathers the weights at or above the highest of kGatherFloors whose weights alone
// reach its goal (their count for top-k, their weight for top-p), usually a handful; every token only when none
// does. Positive floats order like their bits, so a histogram of the gathered weights' top bits finds the bucket
// where the goal is reached, a histogram of the next bits within that bucket narrows it, and a third gives the
// exact weight.

constexpr int kFloors = 3;
constexpr float kGatherFloors[kFloors] = {0x1p-10f, 0x1p-20f, 0x1p-40f};  // beside the heaviest's 1
constexpr int64_t kDrawBlock = 512;          // weights per partial sum of the draw

// f(i, kLanes) over the whole vectors of [begin, end), then f(i, len) once for a shorter tail: the whole ones
// see a constant length, so their loads and stores stay in registers.
template <typename F>
inline void over_vectors(int64_t begin, int64_t end, F f) {
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) f(i, kLanes);
    if (i < end) f(i, static_cast<int>(end - i));
}

struct Weighted {
    float w;
    int32_t id;
};

// The token where a walk over buf[0, m) (positive weights in id order), heaviest first and lower ids first among
// equals, reaches goal: the walk adds each token's weight (kMass, top-p) or 1 (top-k) to `before`, which starts
// at what was walked before these tokens, and stops at the first token that brings it to goal or past. Returns
// {0, INT32_MAX} (everything) when the walk ends short of goal. Overwrites buf.
template <bool kMass>
Weighted reach(Weighted* buf, int64_t m, double before, double goal) {
    constexpr int kShift[3] = {21, 10, 0}, kBuckets[3] = {1024, 2048, 1024};  // the 31 bits of a positive float
    double size[2048];
    for (int level = 0; level < 3 && m > 0; ++level) {
        const int shift = kShift[level], mask = kBuckets[level] - 1;
        auto bucket = [&](float w) {
            uint32_t bits;
            __builtin_memcpy(&bits, &w, 4);
            return static_cast<int>(bits >> shift) & mask;
        };
        for (int b = 0; b < kBuckets[level]; ++b) size[b] = 0.0;
        for (int64_t j = 0; j < m; ++j) size[bucket(buf[j].w)] += kMass ? buf[j].w : 1.0;
        int b = kBuckets[level] - 1;  // heaviest first: the bucket where the walk reaches goal
        for (; b >= 0 && before + size[b] < goal; --b) before += size[b];
        if (b < 0) return {0.0f, INT32_MAX};
        int64_t kept = 0;  // that bucket's tokens, still in id order
        for (int64_t j = 0; j < m; ++j)
            if (bucket(buf[j].w) == b) buf[kept++] = buf[j];
        m = kept;
    }
    // buf[0, m): the tokens of one weight, in id order
    for (int64_t j = 0; j < m; ++j)
        if ((before += kMass ? buf[j].w : 1.0) >= goal) return buf[j];
    return {0.0f, INT32_MAX};  // rounding: the buckets' sums reached goal, their tokens' did not
}

// Bit j set: lane j of x is at least lo.
inline uint32_t lanes_at_least(vf x, float lo) {
#if IRONLM_LANES == 16
    return _mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_GE_OQ);
#elif IRONLM_LANES == 8
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_GE_OQ)));
#else
    return static_cast<uint32_t>(_mm_movemask_ps(_mm_cmpge_ps(x, _mm_set1_ps(lo))));
#endif
}

// Gathers into buf, in id order, the tokens of w[0, n) whose weight is at least `lowest`. Returns how many.
int64_t gather(const float* w, int64_t n, float lowest, Weighted* buf) {
    int64_t m = 0;
    over_vectors(0, n, [&](int64_t i, int len) {
        for (uint32_t bits = lanes_at_least(vload(w + i, len), lowest); bits; bits &= bits - 1) {
            const int64_t j = i + __builtin_ctz(bits);
            buf[m++] = {w[j], static_cast<int32_t>(j)};
        }
    });
    return m;
}

// How many weights, and how much weight, lie at or above each of kGatherFloors.
struct Heavy {
    double count[kFloors], mass[kFloors];
};

// The highest of kGatherFloors whose weights reach goal, by size (count or mass); else the least positive float
// (every token with weight).
float gather_floor(const double (&size)[kFloors], double goal) {
    for (int f = 0; f < kFloors; ++f)
        if (size[f] >= goal) return kGatherFloors[f];
    return __FLT_MIN__;
}

// Replaces each vector of w[0, n) by f(i, x, len) (its weights) and sums the result: each kDrawBlock's sum into
// block_sum and, where a cut comes next (kCount: top-k, kMass: top-p), the weights at or above each of
// kGatherFloors into heavy. Returns the total.
template <bool kCount, bool kMass, typename F>
double reweigh(float* w, int64_t n, F f, double* block_sum, Heavy& heavy) {
    double total = 0.0;
    heavy = {};
    for (int64_t blk = 0; blk * kDrawBlock < n; ++blk) {
        const int64_t end = (blk + 1) * kDrawBlock < n ? (blk + 1) * kDrawBlock : n;
        vf sum = {}, mass[kFloors] = {};
        vi count[kFloors] = {};
        over_vectors(blk * kDrawBlock, end, [&](int64_t i, int len) {
            const vf x = f(i, vload(w + i, len), len);
            vstore(w + i, x, len);
            sum += x;
            for (int g = 0; g < kFloors; ++g) {
                const vi at = x >= kGatherFloors[g];  // -1 where true
                if constexpr (kMass) mass[g] += at ? x : vf{};
                if constexpr (kCount) count[g] -= at;
            }
        });
        block_sum[blk] = hsum(sum);
        total += block_sum[blk];
        for (int g = 0; g < kFloors; ++g) {
            heavy.mass[g] += hsum(mass[g]);
            for (int j = 0; j < kLanes; ++j) heavy.count[g] += count[g][j];
        }
    }
    return total;
}

int64_t sample_row(const SampleArgs& a, int64_t r, Weighted* buf) {
    float* w = a.logits + r * a.ld;  // (vocab): the logits, then their weights
    const int64_t n = a.vocab;
    // The largest logit; NaN never wins a comparison, so it is passed over.
    const vf none = splat(-__builtin_inff());
    vf top[4] = {none, none, none, none};
    int64_t i = 0;
    for (; i + 4 * kLanes <= n; i += 4 * kLanes)  // four maxima in flight
        for (int j = 0; j < 4; ++j) {
            const vf x = vload(w + i + j * kLanes);
            top[j] = x > top[j] ? x : top[j];
        }
    float max = hmax(top[0] > top[1] ? top[0] : top[1]), max2 = hmax(top[2] > top[3] ? top[2] : top[3]);
    max = max2 > max ? max2 : max;
    for (; i < n; ++i) max = w[i] > max ? w[i] : max;
    if (!(max > -__builtin_inff())) return 0;  // no token is possible: pick as greedy would (the first)
    // The weights, cut by min-p (the heaviest weighs 1, so min-p never cuts it).
    const vf inv_t = splat(1.0f / a.temperature[r]), lowest = splat(-87.0f);
    const vf min_p = splat(a.min_p[r]), lane = lane_index();
    double block_sum[kMaxSampleVocab / kDrawBlock];
    Heavy heavy;
    const int64_t k = a.top_k[r];
    const bool top_k = k > 0 && k < n, top_p = a.top_p[r] < 1.0f;
    auto weigh = [&](int64_t, vf l, int len) {
        vf x = (l - max) * inv_t;
        x = x >= lowest ? x : lowest;
        x = l > none ? vexp(x) : vf{};
        if (len < kLanes) x = lane < static_cast<float>(len) ? x : vf{};  // the tail's lanes past the row
        return x >= min_p ? x : vf{};
    };
    double total = top_k ? reweigh<true, false>(w, n, weigh, block_sum, heavy)
                 : top_p ? reweigh<false, true>(w, n, weigh, block_sum, heavy)
                         : reweigh<false, false>(w, n, weigh, block_sum, heavy);
    // top-k: the weights below the k-th largest cut too.
    if (top_k) {
        const double goal = static_cast<double>(k);
        const int64_t m = gather(w, n, gather_floor(heavy.count, goal), buf);
        const vf kth = splat(reach<false>(buf, m, 0.0, goal).w);
        auto cut = [&](int64_t, vf x, int) { return x >= kth ? x : vf{}; };
        total = top_p ? reweigh<false, true>(w, n, cut, block_sum, heavy)
                      : reweigh<false, false>(w, n, cut, block_sum, heavy);
    }
    // top-p: the tokens after the one where the heaviest-first walk reaches top_p of the total cut too.
    if (top_p) {
        const double goal = static_cast<double>(a.top_p[r]) * total;
        const int64_t m = gather(w, n, gather_floor(heavy.mass, goal), buf);
        const Weighted last = reach<true>(buf, m, 0.0, goal);
        const vf last_w = splat(last.w);
        const float last_id = static_cast<float>(last.id);  // ids as floats are exact below 2^24; INT32_MAX rounds up
        total = reweigh<false, false>(w, n, [&](int64_t i, vf x, int) {
            return x > last_w || (x == last_w && lane + static_cast<float>(i) <= last_id) ? x : vf{};
        }, block_sum, heavy);
    }
    // The draw: the first token whose running weight passes u of the total, found block by block, then token by
    // token.
    const double target = a.u[r] * total;
    const int64_t blocks = (n + kDrawBlock - 1) / kDrawBlock;
    double cum = 0.0;
    int64_t blk = 0;
    for (; blk < blocks - 1 && cum + block_sum[blk] <= target; ++blk) cum += block_sum[blk];
    const int64_t begin = blk * kDrawBlock, end = (blk + 1) * kDrawBlock < n ? (blk + 1) * kDrawBlock : n;
    int64_t last = -1;  // the block's last token with weight, should rounding carry the target past the block
    for (i = begin; i < end; ++i) {
        if (w[i] <= 0.0f) continue;
        if ((cum += w[i]) > target) return i;
        last = i;
    }
    if (last >= 0) return last;
    for (i = begin - 1; i >= 0; --i)  // a block left with no weight: the nearest token before it that has some
        if (w[i] > 0.0f) return i;
    return 0;
}

void sample_rows(void* ctx, int64_t begin, int64_t end) {
    const SampleArgs& a = *static_cast<const SampleArgs*>(ctx);
    // Room for a row's tokens, touched only where its top-k bucket or nucleus lies.
    Weighted* buf = static_cast<Weighted*>(scratch_alloc(a.vocab * sizeof(Weighted)));
    for (int64_t r = begin; r < end; ++r) a.out[r] = sample_row(a, r, buf);
    scratch_free(buf);
}

void sample(const SampleArgs& a) {
    SampleArgs copy = a;
    parallel_for(a.rows, sample_rows, &copy);
}

// Hugging Face's repetition penalty over each listed row's seen tokens: a positive logit divided by the penalty, a
// negative one multiplied (as PyTorch computes it, to the bit).
void penalize_rows(void* ctx, int64_t begin, int64_t end) {
    const PenaltyArgs& a = *static_cast<const PenaltyArgs*>(ctx);
    for (int64_t i = begin; i < end; ++i) {
        float* row = a.logits + a.rows[i] * a.ld;
        const float p = a.penalty[i];
        for (int64_t j = a.offsets[i]; j < a.offsets[i + 1]; ++j) {
            float& x = row[a.ids[j]];
            x = x > 0.0f ? x / p : x * p;
        }
    }
}

void repetition_penalty(const PenaltyArgs& a) {
    PenaltyArgs copy = a;
    parallel_for(a.count, penalize_rows, &copy);
}
