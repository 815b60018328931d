// Picks the GEMM of the current ISA level and names it.
#include "gemm.h"

#include "dispatch.h"

namespace ironlm {

constexpr int64_t kAmxMinRows = 32;

void gemm(const GemmArgs& a) {
    switch (current_isa()) {
        case Isa::amx:
            // AMX tiles pay off for bf16 weights with many rows; integer blocks of 32 need a scale
            // per block, which AMX accumulators cannot apply, so they stay on VNNI.
            if (a.fmt == static_cast<int>(WeightFormat::bf16) && a.m >= kAmxMinRows) return gemm_amx_bf16(a);
            return gemm_avx512_bf16(a);
        case Isa::avx512_bf16: return gemm_avx512_bf16(a);
        case Isa::avx512_vnni: return gemm_avx512_vnni(a);
        case Isa::avx512: return gemm_avx512(a);
        case Isa::avx2: return gemm_avx2(a);
        case Isa::scalar: return gemm_scalar(a);
    }
}

std::string gemm_kernel_name(int fmt) {
    const Isa isa = current_isa();
    const bool is_bf16 = fmt == static_cast<int>(WeightFormat::bf16);
    switch (isa) {
        case Isa::amx:
            return is_bf16 ? "amx: tdpbf16ps for 32+ rows, else avx512_bf16 vdpbf16ps"
                           : "avx512_vnni: vpdpbusd, int8 activations";
        case Isa::avx512_bf16:
            return is_bf16 ? "avx512_bf16: vdpbf16ps, bf16 activations" : "avx512_vnni: vpdpbusd, int8 activations";
        case Isa::avx512_vnni:
            return is_bf16 ? "avx512: bf16->fp32 fma" : "avx512_vnni: vpdpbusd, int8 activations";
        case Isa::avx512:
            return is_bf16 ? "avx512: bf16->fp32 fma" : "avx512: vpmaddubsw, int8 activations";
        case Isa::avx2:
            return is_bf16 ? "avx2: bf16->fp32 fma" : "avx2: vpmaddubsw, int8 activations";
        case Isa::scalar: break;
    }
    return is_bf16 ? "scalar: fp32" : "scalar: int8 activations";
}

}  // namespace ironlm
