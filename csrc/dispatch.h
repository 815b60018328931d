// CPU feature detection and the choice of kernel ISA level.
#pragma once
#include <string>

namespace ironlm {

// Ordered by preference. Each level needs the CPU features of the ones before it, except avx_vnni: 256-bit
// vpdpbusd, which a CPU offers as AVX-VNNI (VEX form: Intel Core from Alder Lake on) or, with AVX512-VNNI + VL,
// in EVEX form, and which AVX-512 F/BW/VL alone (Skylake-X) lacks.
enum class Isa : int { scalar = 0, avx2 = 1, avx_vnni = 2, avx512 = 3, avx512_vnni = 4, avx512_bf16 = 5, amx = 6 };

struct CpuFeatures {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
    bool avx512_vnni = false, avx512_bf16 = false, avx_vnni = false;
    bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
    bool os_avx = false, os_avx512 = false, os_amx = false;  // OS saves the register state
    bool amx_permitted = false;                              // arch_prctl granted XTILEDATA
};

const CpuFeatures& cpu_features();
// Whether the CPU and OS can run every kernel of `isa`.
bool isa_supported(const CpuFeatures& f, Isa isa);
Isa best_isa(const CpuFeatures& f);
// Whether the avx_vnni level runs in EVEX form here (AVX512-VNNI + VL without AVX-VNNI).
bool avx_vnni_evex(const CpuFeatures& f);
// The level in use: the best one, or the one IRONLM_ISA names if this CPU supports it. `why` explains the choice.
Isa active_isa(std::string* why = nullptr);
const char* isa_name(Isa isa);
// The level the kernels use now: active_isa() on first use, then whatever set_isa chose.
Isa current_isa();
// Switches the kernels to `isa` (tests use it to cover every level); false if the CPU lacks it.
bool set_isa(Isa isa);
bool parse_isa(const std::string& name, Isa* out);

// On levels with AVX512-BF16, bf16 products (bf16 weights, prefill attention of a bf16 model) run on vdpbf16ps
// with activations rounded to bf16, or widened to fp32 for FMA. Automatic keeps vdpbf16ps unless it measures
// under kBf16DotMinRatio of the fp32 FMA rate on this CPU (about half on Intel's Sapphire Rapids-class Xeons);
// IRONLM_BF16_DOT=auto|on|off sets the starting mode, set_bf16_dot changes it (tests).
enum class Bf16Dot : int { automatic = 0, on = 1, off = 2 };
constexpr double kBf16DotMinRatio = 0.75;
bool parse_bf16_dot(const std::string& name, Bf16Dot* out);
void set_bf16_dot(Bf16Dot mode);
Bf16Dot bf16_dot_mode();
// vdpbf16ps multiply-adds per second over fp32 FMA ones on one core, timed once (0 without AVX512-BF16).
double bf16_dot_ratio();
// Whether the current level runs bf16 products on vdpbf16ps.
bool bf16_dot_in_use();

// Where memory-bound kernels prefetch (the AVX-512 GEMMs of few rows, decode attention): into L2 on AMD CPUs,
// where prefetching into L1 held the core's miss buffers, so that on Zen 4 1-row int8 GEMMs read their weights
// 1.1-1.8x and decode attention its K/V 1.3-1.6x slower (BENCHMARKS.md); else into L1, as measured on Intel.
// IRONLM_PREFETCH=l1|l2 overrides it; decided once.
bool prefetch_into_l2();

}  // namespace ironlm
