// AVX2 + FMA probe kernels (compiled with -mavx2 -mfma; called only when the CPU and OS support them).
#include <immintrin.h>

#include "prefetch.h"
#include "probe.h"

namespace ironlm::probe {

uint64_t read_avx2(const uint8_t* p, size_t n, bool l2) {
    // Four prefetched streams, as in read_avx512.
    const size_t q = (n / kReadStreams) & ~size_t(63);
    __m256i a[kReadStreams];
    for (int s = 0; s < kReadStreams; ++s) a[s] = _mm256_setzero_si256();
    for (size_t i = 0; i < q; i += 64) {
        _Pragma("GCC unroll 4")
        for (int s = 0; s < kReadStreams; ++s) {
            const uint8_t* row = p + s * q + i;
            prefetch_line(row + kReadPrefetchBytes, l2);
            a[s] = _mm256_add_epi64(a[s], _mm256_load_si256(reinterpret_cast<const __m256i*>(row)));
            a[s] = _mm256_add_epi64(a[s], _mm256_load_si256(reinterpret_cast<const __m256i*>(row + 32)));
        }
    }
    for (int s = 1; s < kReadStreams; ++s) a[0] = _mm256_add_epi64(a[0], a[s]);
    alignas(32) uint64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a[0]);
    uint64_t sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    for (size_t i = kReadStreams * q; i < n; ++i) sum += p[i];
    return sum;
}

double fp32_fma_avx2(int64_t iters, float* sink) {
    // 12 independent chains cover FMA latency (4-5 cycles) times 2 FMA ports.
    constexpr int kChains = 12;
    __m256 acc[kChains];
    _Pragma("GCC unroll 16")
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(static_cast<float>(c));
    const __m256 a = _mm256_set1_ps(1.0001f), b = _mm256_set1_ps(1e-4f);
    for (int64_t i = 0; i < iters; ++i) {
        _Pragma("GCC unroll 16")
        for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(a, b, acc[c]);
    }
    __m256 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm256_add_ps(s, acc[c]);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, s);
    *sink = lanes[0];
    return static_cast<double>(iters) * kChains * 8 * 2;
}

double int8_dot_avx2(int64_t iters, int32_t* sink) {
    // The fastest dot product ironlm's AVX2 kernels run (int4 weights): vpmaddubsw, then vpaddw into 16-bit sums
    // (the vpmaddwd that widens them comes once per 8 of these). Each chain feeds its accumulator back in as the
    // bytes, so nothing is loop-invariant.
    constexpr int kChains = 12;
    __m256i acc[kChains];
    _Pragma("GCC unroll 16")
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_epi32(c);
    const __m256i b = _mm256_set1_epi8(-2);
    for (int64_t i = 0; i < iters; ++i) {
        _Pragma("GCC unroll 16")
        for (int c = 0; c < kChains; ++c)
            acc[c] = _mm256_add_epi16(acc[c], _mm256_maddubs_epi16(acc[c], b));
    }
    __m256i s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm256_add_epi16(s, acc[c]);
    *sink = _mm256_extract_epi32(s, 0);
    return static_cast<double>(iters) * kChains * 32 * 2;  // 32 products a vpmaddubsw
}

}  // namespace ironlm::probe
