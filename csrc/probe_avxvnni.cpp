// AVX-VNNI probe kernel (compiled with -mavx2 -mavxvnni; called only when the CPU reports AVX-VNNI).
#include <immintrin.h>

#include "probe.h"

namespace ironlm::probe {

double int8_dot_avxvnni(int64_t iters, int32_t* sink) {
    constexpr int kChains = 12;
    __m256i acc[kChains];
    _Pragma("GCC unroll 16")
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_epi32(c);
    const __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
    for (int64_t i = 0; i < iters; ++i) {
        _Pragma("GCC unroll 16")
        for (int c = 0; c < kChains; ++c) acc[c] = _mm256_dpbusd_avx_epi32(acc[c], a, b);
    }
    __m256i s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm256_add_epi32(s, acc[c]);
    *sink = _mm256_extract_epi32(s, 0);
    return static_cast<double>(iters) * kChains * 8 * 4 * 2;  // 8 lanes x 4 products
}

}  // namespace ironlm::probe
