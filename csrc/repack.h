// Loading GGML blocks into the packed tile layout.
#pragma once
#include <cstdint>

namespace ironlm {

// GGML rows (n, src_row_bytes) of Q8_0 (fmt int8), Q4_0 (int4_sym) or Q4_1 (int4) blocks into
// `dst`, a zero-filled buffer of the packed size. k is a multiple of 32.
void repack_ggml(int fmt, const uint8_t* src, int64_t src_row_bytes, int64_t n, int64_t k, uint8_t* dst);

}  // namespace ironlm
