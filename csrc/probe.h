// Machine probes for `ironlm bench`: memory bandwidth and peak arithmetic per ISA.
// Each ISA's kernels live in their own file compiled with that ISA's flags; probe.cpp picks at run time.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ironlm::probe {

// Read kernels split their range into kReadStreams streams and prefetch kReadPrefetchBytes ahead on each.
constexpr int kReadStreams = 4;
constexpr size_t kReadPrefetchBytes = 2048;

// Read every byte of [p, p + n) with vector loads; returns a checksum so the loads are not removed. l2: the
// vector kernels prefetch into L2 instead of L1 (which reads faster depends on the CPU; dispatch.h).
uint64_t read_scalar(const uint8_t* p, size_t n, bool l2);
uint64_t read_avx2(const uint8_t* p, size_t n, bool l2);
uint64_t read_avx512(const uint8_t* p, size_t n, bool l2);

// Run `iters` rounds of independent multiply-adds; return the arithmetic operations done (2 per multiply-add).
double fp32_fma_avx2(int64_t iters, float* sink);
double fp32_fma_avx512(int64_t iters, float* sink);
double bf16_dot_avx512(int64_t iters, float* sink);   // vdpbf16ps
double int8_dot_avx512(int64_t iters, int32_t* sink);  // vpdpbusd zmm (AVX512-VNNI)
double int8_dot_avxvnni(int64_t iters, int32_t* sink); // vpdpbusd ymm (AVX-VNNI)
double int8_dot_avx2(int64_t iters, int32_t* sink);    // vpmaddubsw + vpaddw ymm (int16 sums)

}  // namespace ironlm::probe
