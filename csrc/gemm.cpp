// Picks the GEMM of the current ISA level and names it.
#include "gemm.h"

#include <cstdio>

#include "dispatch.h"

namespace ironlm {

constexpr int64_t kAmxMinRows = 32;

bool bf16_gemm_rounds(int64_t m) {
    if (current_isa() == Isa::amx && m >= kAmxMinRows) return true;  // tiles take bf16 activations
    return bf16_dot_in_use();
}

void gemm(const GemmArgs& a) {
    const bool is_bf16 = a.fmt == static_cast<int>(WeightFormat::bf16);
    switch (current_isa()) {
        case Isa::amx:
            // AMX tiles pay off for bf16 weights with many rows; integer blocks of 32 need a scale
            // per block, which AMX accumulators cannot apply, so they stay on VNNI.
            if (is_bf16 && a.m >= kAmxMinRows) return gemm_amx_bf16(a);
            [[fallthrough]];
        case Isa::avx512_bf16:
            // The avx512_vnni build multiplies bf16 weights widened to fp32; its integer kernels are the same.
            if (is_bf16 && !bf16_dot_in_use()) return gemm_avx512_vnni(a);
            return gemm_avx512_bf16(a);
        case Isa::avx512_vnni: return gemm_avx512_vnni(a);
        case Isa::avx512: return gemm_avx512(a);
        case Isa::avx_vnni: return avx_vnni_evex(cpu_features()) ? gemm_avx_vnni_evex(a) : gemm_avx_vnni(a);
        case Isa::avx2: return gemm_avx2(a);
        case Isa::scalar: return gemm_scalar(a);
    }
}

std::string gemm_kernel_name(int fmt) {
    const Isa isa = current_isa();
    if (fmt != static_cast<int>(WeightFormat::bf16)) {
        switch (isa) {
            case Isa::amx:
            case Isa::avx512_bf16:
            case Isa::avx512_vnni: return "avx512_vnni: vpdpbusd, int8 activations";
            case Isa::avx512: return "avx512: vpmaddubsw, int8 activations";
            case Isa::avx_vnni:
                return avx_vnni_evex(cpu_features()) ? "avx_vnni: vpdpbusd ymm (EVEX form, AVX512-VNNI), int8 activations"
                                                     : "avx_vnni: vpdpbusd ymm, int8 activations";
            case Isa::avx2: return "avx2: vpmaddubsw, int8 activations";
            case Isa::scalar: return "scalar: int8 activations";
        }
    }
    std::string name;
    switch (isa) {
        case Isa::amx:
        case Isa::avx512_bf16: {
            char why[96];
            if (bf16_dot_mode() == Bf16Dot::automatic)
                std::snprintf(why, sizeof why, " (vdpbf16ps measured at %.2fx the fp32 FMA rate)", bf16_dot_ratio());
            else
                std::snprintf(why, sizeof why, " (set by IRONLM_BF16_DOT or set_bf16_dot)");
            name = bf16_dot_in_use() ? std::string("avx512_bf16: vdpbf16ps, bf16 activations") + why
                                     : std::string("avx512: bf16->fp32 fma") + why;
            if (isa == Isa::amx) name = "amx: tdpbf16ps for 32+ rows, else " + name;
            return name;
        }
        case Isa::avx512_vnni:
        case Isa::avx512: return "avx512: bf16->fp32 fma";
        case Isa::avx_vnni:
        case Isa::avx2: return "avx2: bf16->fp32 fma";
        case Isa::scalar: break;
    }
    return "scalar: fp32";
}

}  // namespace ironlm
