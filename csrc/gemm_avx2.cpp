// The avx2 kernel level (AVX2 + FMA + F16C): gemm_impl.h over gemm_avx2_prims.h, compiled with this level's flags only
// (see CMakeLists.txt).
#include "dispatch.h"
#include "kernels.h"
#include "prefetch.h"
#include "threadpool.h"

#include <immintrin.h>

namespace ironlm {
namespace {
#include "gemm_avx2_prims.h"
#include "gemm_impl.h"
}  // namespace

void gemm_avx2(const GemmArgs& a) { gemm_impl(a); }

}  // namespace ironlm
