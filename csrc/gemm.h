// GEMM entry point: y = x @ W^T (+ bias) on the current ISA level.
#pragma once
#include <string>

#include "kernels.h"

namespace ironlm {

void gemm(const GemmArgs& a);
// Which instructions the current level uses for a format, for `ironlm info` and QuantLinear.
std::string gemm_kernel_name(int fmt);

}  // namespace ironlm
