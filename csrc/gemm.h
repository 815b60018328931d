// GEMM entry point: y = x @ W^T (+ bias) on the current ISA level.
#pragma once
#include <cstdint>
#include <string>

#include "kernels.h"

namespace ironlm {

void gemm(const GemmArgs& a);
// Which instructions the current level uses for a format, for `ironlm info` and QuantLinear.
std::string gemm_kernel_name(int fmt);

// Whether the bf16 GEMM of the current level rounds `m` rows of activations to bf16.
bool bf16_gemm_rounds(int64_t m);

}  // namespace ironlm
