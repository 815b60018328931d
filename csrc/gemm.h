// GEMM entry point: y = x @ W^T (+ bias) on the current ISA level.
#pragma once
#include <cstdint>
#include <string>

#include "kernels.h"

namespace ironlm {

void gemm(const GemmArgs& a);
// Which instructions the current level uses for a format, for `ironlm info` and QuantLinear.
std::string gemm_kernel_name(int fmt);

// How bf16 weights are multiplied on levels with AVX512-BF16: vdpbf16ps on bf16-rounded activations (dot), or
// the weights widened to fp32 for FMA on fp32 activations (widen). Automatic picks by the two instructions'
// measured rates on this CPU; IRONLM_BF16_GEMM=auto|dot|widen sets the starting mode.
enum class Bf16Gemm : int { automatic = 0, dot = 1, widen = 2 };
bool parse_bf16_gemm(const std::string& name, Bf16Gemm* out);
void set_bf16_gemm(Bf16Gemm mode);
// Whether the bf16 GEMM of the current level rounds `m` rows of activations to bf16.
bool bf16_gemm_rounds(int64_t m);

}  // namespace ironlm
