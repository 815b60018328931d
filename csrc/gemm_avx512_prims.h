// 512-bit primitives for gemm_impl.h. Included by gemm_avx512.cpp, gemm_avx512_vnni.cpp and
// gemm_avx512_bf16.cpp; the compiler flags of each decide which instructions are used here.
// <immintrin.h> is included by the .cpp, outside any namespace.

using VI = __m512i;
using VF = __m512;
constexpr int kMaxR = 4;  // 4 rows x 2 tiles: 8 int + 8 float accumulators
constexpr int kMaxRBf16 = 8;  // 8 rows x 2 tiles: 16 float accumulators
constexpr int kT = 2;
constexpr int kTSmall = 4;  // decode: up to 2 rows x 4 tiles
constexpr int kTSmallBf16 = kTSmall;
constexpr int kSmallRows = 2;
constexpr bool kL2PrefetchLevel = true;  // few-row micro-tiles prefetch into L2 where prefetch_into_l2() says so

inline VI wload(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline VI nib_lo(VI v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0f)); }
inline VI nib_hi(VI v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0f)); }
inline VI iset1(int32_t v) { return _mm512_set1_epi32(v); }
inline VF fzero() { return _mm512_setzero_ps(); }
inline VF fset1(float v) { return _mm512_set1_ps(v); }
inline VF fmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF cvt(VI v) { return _mm512_cvtepi32_ps(v); }
inline VF load_h16(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void fstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF fload(const float* p) { return _mm512_load_ps(p); }

#ifdef __AVX512VNNI__
// Many rows: 16 rows of x against one tile (gemm_impl.h int_micro_wide).
constexpr int kWideRows = 16;
constexpr int32_t kQ8Offset = 128;  // int8 weights are stored as q + 128 and fed unsigned to vpdpbusd
inline VI dot_q4(VI acc, VI w, int32_t x4) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4)); }
inline VI dot_q8(VI acc, VI w, int32_t x4) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4)); }
#else
constexpr int kWideRows = 0;
constexpr int32_t kQ8Offset = 0;  // the sign trick below recovers signed weights exactly
inline VI dot_q4(VI acc, VI w, int32_t x4) {
    // w <= 15, |x| <= 127: pair sums fit int16.
    const VI p16 = _mm512_maddubs_epi16(w, _mm512_set1_epi32(x4));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p16, _mm512_set1_epi16(1)));
}
inline VI dot_q8(VI acc, VI w, int32_t x4) {
    // |w| as unsigned (exact even for -128) times x with w's sign; |x| <= 127 so no overflow.
    const VI ws = _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));
    const VI x = _mm512_set1_epi32(x4);
    const __mmask64 neg = _mm512_movepi8_mask(ws);
    const VI xs = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
    const VI p16 = _mm512_maddubs_epi16(_mm512_abs_epi8(ws), xs);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p16, _mm512_set1_epi16(1)));
}
#endif

#ifdef __AVX512BF16__
#define IRONLM_BF16_DOT 1
inline VF bf16_dot(VF acc, VI w, int32_t x2) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_set1_epi32(x2));
}
#else
inline VF bf16_even(VI w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
inline VF bf16_odd(VI w) {
    return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u))));
}
#endif

inline void quantize_block(const float* row, int8_t* q, float* d, int32_t* sum) {
    const __m512 v0 = _mm512_loadu_ps(row), v1 = _mm512_loadu_ps(row + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));  // round to nearest even
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(q1));
    *d = amax / 127.0f;
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
}
