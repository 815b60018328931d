// Fused ops and decode attention at the avx512 level: ops_impl.h compiled with this level's flags.
#include "dispatch.h"
#include "ops.h"
#include "prefetch.h"
#include "threadpool.h"

#include <immintrin.h>  // widen8 in attention_impl.h, lanes_at_least in sample_impl.h

namespace ironlm {
namespace {
#include "ops_impl.h"
}  // namespace

const OpsTable& ops_avx512() { return kTable; }

}  // namespace ironlm
