// The avx_vnni kernel level (AVX2 + AVX-VNNI): gemm_impl.h over gemm_avx2_prims.h, compiled with this level's flags only
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

void gemm_avx_vnni(const GemmArgs& a) { gemm_impl(a); }

}  // namespace ironlm
