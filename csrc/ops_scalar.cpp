// Fused ops and decode attention at the scalar level: ops_impl.h compiled with this level's flags.
#include "dispatch.h"
#include "ops.h"
#include "prefetch.h"
#include "threadpool.h"

#include <immintrin.h>  // lanes_at_least in sample_impl.h

namespace ironlm {
namespace {
#include "ops_impl.h"
}  // namespace

const OpsTable& ops_scalar() { return kTable; }

const OpsTable& ops() {
    switch (current_isa()) {
        case Isa::scalar: return ops_scalar();
        case Isa::avx2:
        case Isa::avx_vnni: return ops_avx2();  // nothing here gains from 256-bit vpdpbusd
        case Isa::avx512:
        case Isa::avx512_vnni: return ops_avx512();
        default:  // avx512_bf16 and amx; their table differs only where vdpbf16ps is used
            return bf16_dot_in_use() ? ops_avx512_bf16() : ops_avx512();
    }
}

}  // namespace ironlm
