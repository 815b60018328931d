// Fused ops and attention at the avx512_bf16 level (and amx): ops_impl.h with this level's flags, which
// give prefill attention its vdpbf16ps path.
#include "dispatch.h"
#include "ops.h"
#include "prefetch.h"
#include "threadpool.h"

#include <immintrin.h>

namespace ironlm {
namespace {
#include "ops_impl.h"
}  // namespace

const OpsTable& ops_avx512_bf16() { return kTable; }

}  // namespace ironlm
