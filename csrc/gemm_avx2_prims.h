// 256-bit primitives for gemm_impl.h: 16 lanes held as two halves. Included by gemm_avx2.cpp, gemm_avx_vnni.cpp
// and gemm_avx_vnni_evex.cpp; the compiler flags of each decide whether the integer dot products use vpdpbusd.
// <immintrin.h> is included by the .cpp, outside any namespace.

struct VI {
    __m256i lo, hi;  // lanes 0-7 and 8-15
};
struct VF {
    __m256 lo, hi;
};
#if defined(__AVXVNNI__) || defined(__AVX512VNNI__)
// vpdpbusd needs no temporaries, so 4 rows x 1 tile (their accumulators spill a little): 1.15-1.29x as fast as 2
// rows on 16 registers, and 6 or 8 rows slower (BENCHMARKS.md).
constexpr int kMaxR = 4;
#else
constexpr int kMaxR = 2;  // 16 ymm registers: 2 rows x 1 tile of accumulators
#endif
constexpr int kMaxRBf16 = 4;  // 8 float accumulators; 5 or 6 rows measured slower (spills, and 16 rows leave a tail)
constexpr int kT = 1;
constexpr int kTSmall = 1;      // decode, integer formats: 1 tile measured faster than 2 (2-18 %)
constexpr int kTSmallBf16 = 2;  // and bf16: 2 tiles (1 was a third slower)
constexpr int kSmallRows = 1;
constexpr int kWideRows = 0;  // no int_micro_wide: 16 ymm registers
// Prefetches stay in L1 even on AMD: forced onto this level on Zen 4, L2 read 1-row int8/int4 GEMMs 0.70-0.77x as fast.
constexpr bool kL2PrefetchLevel = false;

inline VI wload(const uint8_t* p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
}
inline VI nib_lo(VI v) {
    const __m256i m = _mm256_set1_epi8(0x0f);
    return {_mm256_and_si256(v.lo, m), _mm256_and_si256(v.hi, m)};
}
inline VI nib_hi(VI v) {
    const __m256i m = _mm256_set1_epi8(0x0f);
    return {_mm256_and_si256(_mm256_srli_epi16(v.lo, 4), m), _mm256_and_si256(_mm256_srli_epi16(v.hi, 4), m)};
}
inline VI iset1(int32_t v) { return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
inline VF fzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline VF fset1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline VF fmul(VF a, VF b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline VF fmadd(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline VF cvt(VI v) { return {_mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)}; }
inline VF load_h16(const uint8_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))};
}
inline void fstore(float* p, VF v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
}

#if defined(__AVXVNNI__) || defined(__AVX512VNNI__)
// vpdpbusd on 256 bits: 4 products of unsigned by signed bytes summed into each int32 lane, with no 16-bit step.
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#ifdef __AVXVNNI__
    return _mm256_dpbusd_avx_epi32(acc, u, s);  // VEX form: AVX-VNNI (Intel Core from Alder Lake on)
#else
    return _mm256_dpbusd_epi32(acc, u, s);  // EVEX form of the same instruction: AVX512-VNNI + VL
#endif
}
constexpr int32_t kQ8Offset = 128;  // int8 weights are stored as q + 128 and fed unsigned to vpdpbusd
inline VI dot_q4(VI acc, VI w, int32_t x4) {
    const __m256i x = _mm256_set1_epi32(x4);
    return {dpbusd(acc.lo, w.lo, x), dpbusd(acc.hi, w.hi, x)};
}
inline VI dot_q8(VI acc, VI w, int32_t x4) { return dot_q4(acc, w, x4); }
#else
constexpr int32_t kQ8Offset = 0;  // the sign trick in dot_q8_half recovers signed weights exactly
inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
    const __m256i p16 = _mm256_maddubs_epi16(u, s);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}
// int4 weights: w <= 15 and |x| <= 127, so a pair of products is at most 3,810 and the 8 pairs a lane gets in a
// block of 32 add up to at most 30,480: they sum in int16 and widen once a block, not once a pair.
#define IRONLM_Q4_SUM16 1
inline VI q4_pairs(VI pairs, VI w, int32_t x4) {
    const __m256i x = _mm256_set1_epi32(x4);
    return {_mm256_add_epi16(pairs.lo, _mm256_maddubs_epi16(w.lo, x)), _mm256_add_epi16(pairs.hi, _mm256_maddubs_epi16(w.hi, x))};
}
inline VI q4_widen(VI acc, VI pairs) {
    const __m256i one = _mm256_set1_epi16(1);
    return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(pairs.lo, one)), _mm256_add_epi32(acc.hi, _mm256_madd_epi16(pairs.hi, one))};
}
inline __m256i dot_q8_half(__m256i acc, __m256i w, __m256i x) {
    // |w| as unsigned (exact even for -128) times x with w's sign; |x| <= 127 so no overflow.
    const __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
    return dot4(acc, _mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws));
}
inline VI dot_q8(VI acc, VI w, int32_t x4) {
    const __m256i x = _mm256_set1_epi32(x4);
    return {dot_q8_half(acc.lo, w.lo, x), dot_q8_half(acc.hi, w.hi, x)};
}
#endif

inline VF bf16_even(VI w) {
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w.lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(w.hi, 16))};
}
inline VF bf16_odd(VI w) {
    const __m256i m = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
    return {_mm256_castsi256_ps(_mm256_and_si256(w.lo, m)), _mm256_castsi256_ps(_mm256_and_si256(w.hi, m))};
}

inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

inline void quantize_block(const float* row, int8_t* q, float* d, int32_t* sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(row + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    const float m = hmax(amax);
    const __m256 id = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    __m256i qi[4];
    __m256i s = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
        qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));  // round to nearest even
        s = _mm256_add_epi32(s, qi[i]);
    }
    // int32 -> int8 with order restored after the in-lane packs.
    const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
    const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    const __m256i fixed = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), fixed);
    *d = m / 127.0f;
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    *sum = _mm_cvtsi128_si32(t);
}
