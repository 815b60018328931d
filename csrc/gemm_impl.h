// The GEMM algorithm shared by the SIMD levels. Included inside an anonymous namespace by each
// gemm_<isa>.cpp after it defines its vector primitives, so every level is compiled with its own
// flags and nothing here is shared between translation units.
//
// Primitives the includer provides:
//   VI (16 x int32), VF (16 x float);
//   kMaxR, kMaxRBf16: rows of x per micro-tile for integer and bf16 formats;
//   kT: 16-row weight tiles per micro-tile, kTSmall of them (kTSmallBf16 for bf16) when x has at most
//   kSmallRows rows;
//   kQ8Offset: what int8 weights are stored offset by, as seen by dot_q8;
//   kL2PrefetchLevel: whether few-row micro-tiles may prefetch into L2 (prefetch_into_l2, dispatch.h);
//   kWideRows: rows of x per int_micro_wide call (0: none), which needs fload as well;
//   wload, nib_lo, nib_hi, iset1, fzero, fset1, fmul, fmadd, cvt, load_h16, fstore, dot_q4, dot_q8,
//   quantize_block, and either bf16_dot (with IRONLM_BF16_DOT defined) or bf16_even/bf16_odd;
//   with IRONLM_Q4_SUM16 defined, q4_pairs and q4_widen instead of dot_q4 for the int4 formats.

// Software prefetch distance along each tile's weight stream; the hardware prefetchers alone
// leave single-core bandwidth on the table.
constexpr int64_t kPrefetchBytes = 2048;


// What a micro-tile prefetches: kPrefetchBytes along its own streams (near), the next micro-tile (unit), or
// nothing (its weights are already in cache).
enum class Ahead { near, unit, none };
constexpr int64_t kUnitAheadBytes = 64 << 10;  // the largest micro-tile whose successor is fetched a whole pass ahead

inline int32_t load_i32(const int8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

inline int32_t load_i32(const uint16_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return static_cast<uint16_t>(u >> 16);
}

inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

// What the integer formats' weights are stored offset by, as the dot products see them; a block's products are
// corrected by -offset * (sum of its quantized activations).
constexpr int32_t weight_offset(int fmt) {
    return fmt == static_cast<int>(WeightFormat::int8) ? kQ8Offset : fmt == static_cast<int>(WeightFormat::int4_sym) ? 8 : 0;
}

// Activations prepared once per call: int8 blocks for the integer formats, bf16 or float rows for bf16.
struct Prepared {
    const GemmArgs* a;
    int64_t num_tiles;
    // Indexed by row, but written only for rows outside whole groups of kWideRows (int_micro's rows):
    int8_t* xq;      // (m, k_padded)
    float* xs;       // (m, k_padded / 32) block scales
    int32_t* xsum;   // (m, k_padded / 32) sums of the quantized block
    float* xmin;     // (m, k_padded / 32) xs * xsum, what a block's minimum is multiplied by (int4)
    // For int_micro_wide, the same for the rows of whole groups of kWideRows, interleaved by block: a group's
    // rows of one block lie together, so the kernel reads all of them from one pointer at fixed offsets.
    int8_t* gq;      // (groups, k_padded / 32, kWideRows, 32)
    float* gs;       // (groups, k_padded / 32, kWideRows) block scales
    float* gmin;     // (groups, k_padded / 32, kWideRows) xs * xsum
    int32_t* goff;   // (groups, k_padded / 32, kWideRows) -offset * xsum, what the dot products start from
    uint16_t* xb;    // (m, k_padded) bf16
    float* xf;       // (m, k_padded) float
    // Micro-tiles that stream their weights from memory (int_micro; bf16_micro of up to kSmallRows rows)
    // prefetch into L2 rather than L1 (prefetch_into_l2); the 16-row and many-row ones compute from L1 and
    // measured slower so.
    bool l2;
};

constexpr int64_t kPrepareRun = kWideRows > 0 ? kWideRows : 1;  // rows per group, and per unit of prepare_row_runs

// Whether row r of x lies in a whole group of kWideRows, which int_micro_wide reads from p.gq.
inline bool in_group(const Prepared& p, int64_t r) {
    if constexpr (kWideRows > 0) return p.gq && r < p.a->m / kWideRows * kWideRows;
    return false;
}

void prepare_rows(void* ctx, int64_t begin, int64_t end) {
    const Prepared& p = *static_cast<const Prepared*>(ctx);
    const GemmArgs& a = *p.a;
    const int64_t kp = a.k_padded, kb = kp / kBlock;
    alignas(64) float row[kBlock];
    for (int64_t r = begin; r < end; ++r) {
        for (int64_t b = 0; b < kb; ++b) {
            // Typed loops without a per-element branch, so the compiler vectorizes the load.
            const int64_t c0 = b * kBlock;
            const int n = a.k - c0 >= kBlock ? kBlock : static_cast<int>(a.k - c0);
            if (a.x_bf16) {
                const uint16_t* src = static_cast<const uint16_t*>(a.x) + r * a.ldx + c0;
                for (int i = 0; i < n; ++i) row[i] = bf16_to_f32(src[i]);
            } else {
                const float* src = static_cast<const float*>(a.x) + r * a.ldx + c0;
                for (int i = 0; i < n; ++i) row[i] = src[i];
            }
            for (int i = n; i < kBlock; ++i) row[i] = 0.0f;
            if (p.xq && in_group(p, r)) {  // rows in whole groups go to the group arrays only
                const int64_t j = ((r / kPrepareRun) * kb + b) * kPrepareRun + r % kPrepareRun;
                int32_t sum;
                quantize_block(row, p.gq + j * kBlock, p.gs + j, &sum);
                p.gmin[j] = p.gs[j] * static_cast<float>(sum);
                p.goff[j] = -weight_offset(a.fmt) * sum;
            } else if (p.xq) {
                const int64_t i = r * kb + b;
                quantize_block(row, p.xq + i * kBlock, p.xs + i, p.xsum + i);
                p.xmin[i] = p.xs[i] * static_cast<float>(p.xsum[i]);
            } else if (p.xb) {
                for (int i = 0; i < kBlock; ++i) p.xb[r * kp + b * kBlock + i] = f32_to_bf16(row[i]);
            } else {
                for (int i = 0; i < kBlock; ++i) p.xf[r * kp + b * kBlock + i] = row[i];
            }
        }
    }
}

void prepare_row_runs(void* ctx, int64_t begin, int64_t end) {
    const Prepared& p = *static_cast<const Prepared*>(ctx);
    const int64_t r_end = end * kPrepareRun;
    prepare_rows(ctx, begin * kPrepareRun, r_end < p.a->m ? r_end : p.a->m);
}

void store_tile(const GemmArgs& a, int64_t r, int64_t tile, VF acc) {
    alignas(64) float out[kTileRows];
    fstore(out, acc);
    const int64_t c0 = tile * kTileRows;
    const int64_t cols = a.n - c0 < kTileRows ? a.n - c0 : kTileRows;
    for (int64_t j = 0; j < cols; ++j) {
        const float v = out[j] + (a.bias ? a.bias[c0 + j] : 0.0f);
        if (a.y_bf16) static_cast<uint16_t*>(a.y)[r * a.ldy + c0 + j] = f32_to_bf16(v);
        else static_cast<float*>(a.y)[r * a.ldy + c0 + j] = v;
    }
}

// R rows of x times T tiles of 16 output rows, over all of K.
template <int FMT, int R, int T>
void int_micro(const Prepared& p, int64_t r0, int64_t tile0, Ahead ahead) {
    const GemmArgs& a = *p.a;
    const int64_t kp = a.k_padded, kb = kp / kBlock;
    const int64_t tb = tile_block_bytes(FMT);
    constexpr int64_t qbytes = FMT == static_cast<int>(WeightFormat::int8) ? 8 * 64 : 4 * 64;
    constexpr int32_t offset = weight_offset(FMT);
    VF acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = fzero();
    const int64_t stream = kb * tb;  // bytes of one tile's weights, tiles back to back
    const uint8_t* wt[T];
    for (int t = 0; t < T; ++t) wt[t] = a.w + (tile0 + t) * stream;
    for (int64_t b = 0; b < kb; ++b) {
        const int8_t* xr[R];
        VI ai[R][T];
        for (int r = 0; r < R; ++r) {
            xr[r] = p.xq + (r0 + r) * kp + b * kBlock;
            const VI init = iset1(-offset * p.xsum[(r0 + r) * kb + b]);
            for (int t = 0; t < T; ++t) ai[r][t] = init;
        }
        if (FMT == static_cast<int>(WeightFormat::int8)) {
            for (int g = 0; g < 8; ++g) {
                for (int t = 0; t < T; ++t) {
                    const VI w = wload(wt[t] + g * 64);
                    for (int r = 0; r < R; ++r) ai[r][t] = dot_q8(ai[r][t], w, load_i32(xr[r] + 4 * g));
                }
            }
        } else {
            // The products gather in `sums`: 16-bit pair sums widened once a block where the level defines
            // IRONLM_Q4_SUM16 (q4_pairs, q4_widen), else the int32 accumulators themselves (dot_q4).
#ifdef IRONLM_Q4_SUM16
            VI sums[R][T];
            for (int r = 0; r < R; ++r)
                for (int t = 0; t < T; ++t) sums[r][t] = iset1(0);
            const auto step = q4_pairs;
#else
            VI (&sums)[R][T] = ai;
            const auto step = dot_q4;
#endif
            for (int v = 0; v < 4; ++v) {
                for (int t = 0; t < T; ++t) {
                    const VI w = wload(wt[t] + v * 64);
                    const VI lo = nib_lo(w), hi = nib_hi(w);
                    for (int r = 0; r < R; ++r) {
                        sums[r][t] = step(sums[r][t], lo, load_i32(xr[r] + 4 * v));
                        sums[r][t] = step(sums[r][t], hi, load_i32(xr[r] + 16 + 4 * v));
                    }
                }
            }
#ifdef IRONLM_Q4_SUM16
            for (int r = 0; r < R; ++r)
                for (int t = 0; t < T; ++t) ai[r][t] = q4_widen(ai[r][t], sums[r][t]);
#endif
        }
        if (ahead == Ahead::unit) {  // the same block of each tile of the next micro-tile, into L2
            for (int t = 0; t < T; ++t)
                for (int64_t off = 0; off < tb; off += 64) prefetch_line(wt[t] + T * stream + off, true);
        } else if (ahead == Ahead::near) {
            // Near a tile's end, run ahead into the same tile of the next micro-tile (T tiles on), so the
            // next call finds its streams already started instead of waiting on DRAM.
            const int64_t jump = b * tb + kPrefetchBytes >= stream ? (T - 1) * stream : 0;
            for (int t = 0; t < T; ++t)
                for (int64_t off = 0; off < tb; off += 64) prefetch_line(wt[t] + kPrefetchBytes + jump + off, p.l2);
        }
        VF d[T];
        for (int t = 0; t < T; ++t) d[t] = load_h16(wt[t] + qbytes);
        for (int r = 0; r < R; ++r) {
            const VF s = fset1(p.xs[(r0 + r) * kb + b]);
            for (int t = 0; t < T; ++t) acc[r][t] = fmadd(cvt(ai[r][t]), fmul(d[t], s), acc[r][t]);
        }
        if (FMT == static_cast<int>(WeightFormat::int4)) {
            for (int t = 0; t < T; ++t) d[t] = load_h16(wt[t] + qbytes + 32);  // the block minimums
            for (int r = 0; r < R; ++r) {
                const VF s = fset1(p.xmin[(r0 + r) * kb + b]);
                for (int t = 0; t < T; ++t) acc[r][t] = fmadd(d[t], s, acc[r][t]);
            }
        }
        for (int t = 0; t < T; ++t) wt[t] += tb;
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) store_tile(a, r0 + r, tile0 + t, acc[r][t]);
}

// kWideRows (R) rows of x times one tile of 16 output rows, over all of K. Per block of 32, each row costs 8 dot
// products and 3 float operations (convert, scale, accumulate; int4 adds its minimum) while the weight loads, the
// nibble unpacking and the scale loads are shared by all R rows, and the offset correction is a broadcast load.
// The R integer accumulators fill half the registers, so the float sums live in L1: their loads and stores go to
// ports the dot products leave idle. Against int_micro, at 16-512 rows: int4 1.17-1.31x (session 15), int4_sym
// 1.10-1.29x and int8 1.09-1.42x (session 16, with the offset correction precomputed; BENCHMARKS.md).
template <int FMT, int R>
void int_micro_wide(const Prepared& p, int64_t r0, int64_t tile) {
    const GemmArgs& a = *p.a;
    const int64_t kb = a.k_padded / kBlock, tb = tile_block_bytes(FMT);
    constexpr int64_t qbytes = FMT == static_cast<int>(WeightFormat::int8) ? 8 * 64 : 4 * 64;
    alignas(64) float acc[R][kTileRows] = {};
    const uint8_t* w = a.w + tile * kb * tb;
    const int64_t i0 = r0 * kb;  // r0 starts a group (p.gq): its blocks follow at steps of R
    for (int64_t b = 0; b < kb; ++b, w += tb) {
        for (int64_t off = 0; off < tb; off += 64) prefetch_line(w + kPrefetchBytes + off, false);  // runs on into the next tile
        const int8_t* xb = p.gq + (i0 + b * R) * kBlock;  // (R, 32)
        const float* xs = p.gs + i0 + b * R;
        VI ai[R];
        for (int r = 0; r < R; ++r) ai[r] = iset1(weight_offset(FMT) ? p.goff[i0 + b * R + r] : 0);  // a broadcast load
        if constexpr (FMT == static_cast<int>(WeightFormat::int8)) {
            _Pragma("GCC unroll 8")
            for (int g = 0; g < 8; ++g) {
                const VI wv = wload(w + g * 64);
                for (int r = 0; r < R; ++r) ai[r] = dot_q8(ai[r], wv, load_i32(xb + r * kBlock + 4 * g));
            }
        } else {
            _Pragma("GCC unroll 4")  // rolled, the 16 accumulators were copied and spilled between iterations
            for (int v = 0; v < 4; ++v) {
                const VI wv = wload(w + v * 64);
                const VI lo = nib_lo(wv), hi = nib_hi(wv);
                for (int r = 0; r < R; ++r) {
                    ai[r] = dot_q4(ai[r], lo, load_i32(xb + r * kBlock + 4 * v));
                    ai[r] = dot_q4(ai[r], hi, load_i32(xb + r * kBlock + 16 + 4 * v));
                }
            }
        }
        const VF d = load_h16(w + qbytes);  // block scales
        if constexpr (FMT == static_cast<int>(WeightFormat::int4)) {
            const VF m = load_h16(w + qbytes + 32);  // block minimums
            const float* xmin = p.gmin + i0 + b * R;
            for (int r = 0; r < R; ++r)
                fstore(acc[r], fmadd(m, fset1(xmin[r]), fmadd(cvt(ai[r]), fmul(d, fset1(xs[r])), fload(acc[r]))));
        } else {
            for (int r = 0; r < R; ++r) fstore(acc[r], fmadd(cvt(ai[r]), fmul(d, fset1(xs[r])), fload(acc[r])));
        }
    }
    for (int r = 0; r < R; ++r) store_tile(a, r0 + r, tile, fload(acc[r]));
}

template <int R, int T>
void bf16_micro(const Prepared& p, int64_t r0, int64_t tile0) {
    const GemmArgs& a = *p.a;
    const int64_t kp = a.k_padded, pairs = kp / 2;
    VF acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = fzero();
    const int64_t stream = pairs * 64;  // bytes of one tile's weights, tiles back to back
    const uint8_t* wt[T];
    for (int t = 0; t < T; ++t) wt[t] = a.w + (tile0 + t) * stream;
    for (int64_t q = 0; q < pairs; ++q) {
        // The prefetch runs ahead into the same tile of the next micro-tile near a tile's end, as int_micro's.
        const int64_t near = q * 64 + kPrefetchBytes;
        const int64_t pf = near >= stream ? near + (T - 1) * stream : near;
        for (int t = 0; t < T; ++t) {
            prefetch_line(wt[t] + pf, R <= kSmallRows && p.l2);
            const VI w = wload(wt[t] + q * 64);
#ifdef IRONLM_BF16_DOT
            for (int r = 0; r < R; ++r) acc[r][t] = bf16_dot(acc[r][t], w, load_i32(p.xb + (r0 + r) * kp + 2 * q));
#else
            const VF we = bf16_even(w), wo = bf16_odd(w);
            for (int r = 0; r < R; ++r) {
                const float* x = p.xf + (r0 + r) * kp + 2 * q;
                acc[r][t] = fmadd(wo, fset1(x[1]), fmadd(we, fset1(x[0]), acc[r][t]));
            }
#endif
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) store_tile(a, r0 + r, tile0 + t, acc[r][t]);
}

template <int FMT, int R, int T>
void micro(const Prepared& p, int64_t r0, int64_t tile0, Ahead ahead) {
    if constexpr (FMT == static_cast<int>(WeightFormat::bf16)) bf16_micro<R, T>(p, r0, tile0);
    else int_micro<FMT, R, T>(p, r0, tile0, ahead);
}

// Rows [r0, r0 + rest) with rest < kMaxRows, as one micro-tile of exactly `rest` rows.
template <int FMT, int T, int R>
void row_tail(const Prepared& p, int64_t r0, int64_t rest, int64_t tile0, Ahead ahead) {
    if constexpr (R > 0) {
        if (rest == R) micro<FMT, R, T>(p, r0, tile0, ahead);
        else row_tail<FMT, T, R - 1>(p, r0, rest, tile0, ahead);
    }
}

template <int FMT, int T>
void rows_for_tiles(const Prepared& p, int64_t r_begin, int64_t r_end, int64_t tile0) {
    // Integer formats where the level has kWideRows: whole groups of that many rows one tile at a time, the rest below.
    if constexpr (kWideRows > 0 && FMT != static_cast<int>(WeightFormat::bf16)) {
        for (; r_begin + kWideRows <= r_end; r_begin += kWideRows)
            for (int t = 0; t < T; ++t) int_micro_wide<FMT, kWideRows>(p, r_begin, tile0 + t);
        if (r_begin == r_end) return;
    }
    // bf16 needs no integer accumulators, so it affords more rows per micro-tile.
    constexpr int kRows = FMT == static_cast<int>(WeightFormat::bf16) ? kMaxRBf16 : kMaxR;
    // With several passes of rows over the same tiles, the first pass fetches the next micro-tile's weights
    // while the later passes compute from cache, so DRAM streams during all of them instead of during the
    // first only. Only for small micro-tiles: larger ones (long rows, int8, bf16) crowd the current one out
    // of L2 and measured slower.
    const int64_t unit_bytes = T * (p.a->k_padded / kBlock) * tile_block_bytes(FMT);
    const bool passes = r_end - r_begin > kRows && unit_bytes <= kUnitAheadBytes;
    Ahead ahead = passes ? Ahead::unit : Ahead::near;
    int64_t r0 = r_begin;
    for (; r0 + kRows <= r_end; r0 += kRows) {
        micro<FMT, kRows, T>(p, r0, tile0, ahead);
        if (passes) ahead = Ahead::none;
    }
    row_tail<FMT, T, kRows - 1>(p, r0, r_end - r0, tile0, ahead);
}

constexpr int64_t kRowBlock = 64;  // rows of x kept in L2 while a thread sweeps its tiles

template <int FMT, int T>
void gemm_units(void* ctx, int64_t begin, int64_t end) {
    const Prepared& p = *static_cast<const Prepared*>(ctx);
    for (int64_t rb = 0; rb < p.a->m; rb += kRowBlock) {
        const int64_t re = rb + kRowBlock < p.a->m ? rb + kRowBlock : p.a->m;
        for (int64_t u = begin; u < end; ++u) {
            const int64_t tile0 = u * T;
            if (tile0 + T <= p.num_tiles) rows_for_tiles<FMT, T>(p, rb, re, tile0);
            else
                for (int64_t t = tile0; t < p.num_tiles; ++t) rows_for_tiles<FMT, 1>(p, rb, re, t);
        }
    }
}

template <int FMT>
void run_units(const Prepared& p) {
    // Few rows: more tiles per micro-tile, for more independent accumulator chains.
    constexpr int small = FMT == static_cast<int>(WeightFormat::bf16) ? kTSmallBf16 : kTSmall;
    if (p.a->m <= kSmallRows) parallel_for((p.num_tiles + small - 1) / small, gemm_units<FMT, small>, const_cast<Prepared*>(&p));
    else parallel_for((p.num_tiles + kT - 1) / kT, gemm_units<FMT, kT>, const_cast<Prepared*>(&p));
}

void gemm_impl(const GemmArgs& a) {
    Prepared p{};
    p.a = &a;
    p.l2 = kL2PrefetchLevel && prefetch_into_l2();
    p.num_tiles = (a.n + kTileRows - 1) / kTileRows;
    const int64_t kp = a.k_padded, kb = kp / kBlock;
    const bool is_bf16 = a.fmt == static_cast<int>(WeightFormat::bf16);
    void* scratch;
    if (!is_bf16) {
        int64_t grouped = 0;  // rows in whole groups, copied for int_micro_wide
        if constexpr (kWideRows > 0) grouped = a.m / kWideRows * kWideRows;
        const int64_t xq_bytes = ((a.m * kp + 63) / 64) * 64;
        scratch = scratch_alloc(xq_bytes + a.m * 12 * kb + grouped * (kp + 12 * kb));
        p.xq = static_cast<int8_t*>(scratch);
        p.xs = reinterpret_cast<float*>(p.xq + xq_bytes);
        p.xsum = reinterpret_cast<int32_t*>(p.xs + a.m * kb);
        p.xmin = reinterpret_cast<float*>(p.xsum + a.m * kb);
        if (grouped > 0) {
            p.gq = reinterpret_cast<int8_t*>(p.xmin + a.m * kb);
            p.gs = reinterpret_cast<float*>(p.gq + grouped * kp);
            p.gmin = p.gs + grouped * kb;
            p.goff = reinterpret_cast<int32_t*>(p.gmin + grouped * kb);
        }
    } else {
#ifdef IRONLM_BF16_DOT
        scratch = scratch_alloc(a.m * kp * 2);
        p.xb = static_cast<uint16_t*>(scratch);
#else
        scratch = scratch_alloc(a.m * kp * 4);
        p.xf = static_cast<float*>(scratch);
#endif
    }
    // Preparing activations is cheap for decode; split it only when there are many rows, and with a grouped copy
    // in whole groups, whose rows share the cache lines of their block scales there.
    if (a.m >= 16 && p.gq) parallel_for((a.m + kPrepareRun - 1) / kPrepareRun, prepare_row_runs, &p);
    else if (a.m >= 16) parallel_for(a.m, prepare_rows, &p);
    else prepare_rows(&p, 0, a.m);
    switch (static_cast<WeightFormat>(a.fmt)) {
        case WeightFormat::int8: run_units<static_cast<int>(WeightFormat::int8)>(p); break;
        case WeightFormat::int4: run_units<static_cast<int>(WeightFormat::int4)>(p); break;
        case WeightFormat::int4_sym: run_units<static_cast<int>(WeightFormat::int4_sym)>(p); break;
        case WeightFormat::bf16: run_units<static_cast<int>(WeightFormat::bf16)>(p); break;
    }
    scratch_free(scratch);
}
