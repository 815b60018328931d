// Quantizing dense weights into the packed tile layout.
#pragma once
#include <cstdint>

namespace ironlm {

// Dense (n, k) float32 or bfloat16 rows (stride ld elements) to int8 / int4 / int4_sym tiles in
// `dst`, a zero-filled buffer of the packed size; K is padded with zeros to a multiple of 32.
void quantize_pack(int fmt, const void* src, bool src_bf16, int64_t ld, int64_t n, int64_t k, uint8_t* dst);

}  // namespace ironlm
