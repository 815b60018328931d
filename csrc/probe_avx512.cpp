// AVX-512 probe kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512bf16;
// each function is called only when the CPU and OS support the instructions it uses).
#include <immintrin.h>

#include "prefetch.h"
#include "probe.h"

namespace ironlm::probe {

constexpr int kChains = 12;  // independent accumulators: latency x ports

uint64_t read_avx512(const uint8_t* p, size_t n, bool l2) {
    // Four streams with software prefetch, as the GEMM kernels read their weight tiles: a single
    // hardware-prefetched stream leaves a core's bandwidth on the table.
    const size_t q = (n / kReadStreams) & ~size_t(63);
    __m512i a[kReadStreams];
    for (int s = 0; s < kReadStreams; ++s) a[s] = _mm512_setzero_si512();
    for (size_t i = 0; i < q; i += 64) {
        _Pragma("GCC unroll 4")
        for (int s = 0; s < kReadStreams; ++s) {
            prefetch_line(p + s * q + i + kReadPrefetchBytes, l2);
            a[s] = _mm512_add_epi64(a[s], _mm512_load_si512(p + s * q + i));
        }
    }
    for (int s = 1; s < kReadStreams; ++s) a[0] = _mm512_add_epi64(a[0], a[s]);
    uint64_t sum = _mm512_reduce_add_epi64(a[0]);
    for (size_t i = kReadStreams * q; i < n; ++i) sum += p[i];
    return sum;
}

double fp32_fma_avx512(int64_t iters, float* sink) {
    __m512 acc[kChains];
    _Pragma("GCC unroll 16")
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c));
    const __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(1e-4f);
    for (int64_t i = 0; i < iters; ++i) {
        _Pragma("GCC unroll 16")
        for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(a, b, acc[c]);
    }
    __m512 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
    *sink = _mm512_reduce_add_ps(s);
    return static_cast<double>(iters) * kChains * 16 * 2;
}

double bf16_dot_avx512(int64_t iters, float* sink) {
    __m512 acc[kChains];
    _Pragma("GCC unroll 16")
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c));
    const __m512 x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(1e-4f);
    const __m512bh a = _mm512_cvtne2ps_pbh(x, x), b = _mm512_cvtne2ps_pbh(y, y);
    for (int64_t i = 0; i < iters; ++i) {
        _Pragma("GCC unroll 16")
        for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
    }
    __m512 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
    *sink = _mm512_reduce_add_ps(s);
    return static_cast<double>(iters) * kChains * 16 * 2 * 2;  // 16 lanes x 2 bf16 pairs
}

double int8_dot_avx512(int64_t iters, int32_t* sink) {
    __m512i acc[kChains];
    _Pragma("GCC unroll 16")
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_epi32(c);
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    for (int64_t i = 0; i < iters; ++i) {
        _Pragma("GCC unroll 16")
        for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbusd_epi32(acc[c], a, b);
    }
    __m512i s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm512_add_epi32(s, acc[c]);
    *sink = _mm512_reduce_add_epi32(s);
    return static_cast<double>(iters) * kChains * 16 * 4 * 2;  // 16 lanes x 4 byte products
}

}  // namespace ironlm::probe
