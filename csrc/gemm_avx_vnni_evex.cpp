// The avx_vnni kernel level in EVEX form, for CPUs with AVX512-VNNI but not AVX-VNNI (so the 256-bit kernels can be
// run and tested there): gemm_avx_vnni.cpp's code, compiled with AVX512-VNNI + VL flags instead (see CMakeLists.txt).
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

void gemm_avx_vnni_evex(const GemmArgs& a) { gemm_impl(a); }

}  // namespace ironlm
