// The avx512_bf16 kernel level: gemm_impl.h compiled with this level's flags only (see CMakeLists.txt).
#include "dispatch.h"
#include "kernels.h"
#include "prefetch.h"
#include "threadpool.h"

#include <immintrin.h>

namespace ironlm {
namespace {
#include "gemm_avx512_prims.h"
#include "gemm_impl.h"
}  // namespace

void gemm_avx512_bf16(const GemmArgs& a) { gemm_impl(a); }

}  // namespace ironlm
