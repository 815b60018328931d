// Picks the GEMM of the current ISA level and names it.
#include "gemm.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "dispatch.h"
#include "probe.h"

namespace ironlm {
namespace {

constexpr int64_t kAmxMinRows = 32;
// vdpbf16ps is kept unless it gives under this fraction of the fp32 FMA rate: the widening path pays two
// conversions per weight vector and measured ~0.8 of the FMA peak, the vdpbf16ps one ~0.95 of its own.
constexpr double kBf16DotMinRatio = 0.75;

struct Bf16Rate {
    double ratio = 0.0;  // multiply-adds per second of vdpbf16ps over those of fp32 FMA, on one core
};

Bf16Rate measure_bf16_rate() {
    // Best of three short runs of each, taken in turns, so a preemption or a frequency change hits one run only.
    using Clock = std::chrono::steady_clock;
    constexpr int64_t kIters = 4096;
    double best_dot = 0.0, best_fma = 0.0;
    float sink = 0.0f;
    for (int round = 0; round < 3; ++round) {
        auto t0 = Clock::now();
        const double dot_ops = probe::bf16_dot_avx512(kIters, &sink);
        auto t1 = Clock::now();
        const double fma_ops = probe::fp32_fma_avx512(kIters, &sink);
        auto t2 = Clock::now();
        const double dot_s = std::chrono::duration<double>(t1 - t0).count();
        const double fma_s = std::chrono::duration<double>(t2 - t1).count();
        if (dot_s > 0 && dot_ops / dot_s > best_dot) best_dot = dot_ops / dot_s;
        if (fma_s > 0 && fma_ops / fma_s > best_fma) best_fma = fma_ops / fma_s;
    }
    return {best_fma > 0 ? best_dot / best_fma : 0.0};
}

// Measured on first use, only where the CPU has AVX512-BF16.
const Bf16Rate& bf16_rate() {
    static const Bf16Rate rate = measure_bf16_rate();  // immutable after first call
    return rate;
}

Bf16Gemm mode_from_env() {
    Bf16Gemm mode = Bf16Gemm::automatic;
    const char* env = std::getenv("IRONLM_BF16_GEMM");
    if (env && *env && !parse_bf16_gemm(env, &mode))
        std::fprintf(stderr, "ironlm: IRONLM_BF16_GEMM=%s is not auto, dot or widen; using auto\n", env);
    return mode;
}

std::atomic<int>& bf16_mode() {
    static std::atomic<int> mode{static_cast<int>(mode_from_env())};
    return mode;
}

bool has_bf16_dot(Isa isa) { return isa == Isa::avx512_bf16 || isa == Isa::amx; }

// Whether bf16 weights go through vdpbf16ps at the current level (else they are widened to fp32 for FMA).
bool bf16_dot_in_use() {
    if (!has_bf16_dot(current_isa())) return false;
    switch (static_cast<Bf16Gemm>(bf16_mode().load(std::memory_order_relaxed))) {
        case Bf16Gemm::dot: return true;
        case Bf16Gemm::widen: return false;
        case Bf16Gemm::automatic: break;
    }
    return bf16_rate().ratio >= kBf16DotMinRatio;
}

}  // namespace

bool parse_bf16_gemm(const std::string& name, Bf16Gemm* out) {
    if (name == "auto") *out = Bf16Gemm::automatic;
    else if (name == "dot") *out = Bf16Gemm::dot;
    else if (name == "widen") *out = Bf16Gemm::widen;
    else return false;
    return true;
}

void set_bf16_gemm(Bf16Gemm mode) { bf16_mode().store(static_cast<int>(mode), std::memory_order_relaxed); }

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
            case Isa::avx2: return "avx2: vpmaddubsw, int8 activations";
            case Isa::scalar: return "scalar: int8 activations";
        }
    }
    std::string name;
    switch (isa) {
        case Isa::amx:
        case Isa::avx512_bf16: {
            char why[96];
            const auto mode = static_cast<Bf16Gemm>(bf16_mode().load(std::memory_order_relaxed));
            if (mode == Bf16Gemm::automatic)
                std::snprintf(why, sizeof why, " (vdpbf16ps measured at %.2fx the fp32 FMA rate)", bf16_rate().ratio);
            else
                std::snprintf(why, sizeof why, " (set by IRONLM_BF16_GEMM or set_bf16_gemm)");
            name = bf16_dot_in_use() ? std::string("avx512_bf16: vdpbf16ps, bf16 activations") + why
                                     : std::string("avx512: bf16->fp32 fma") + why;
            if (isa == Isa::amx) name = "amx: tdpbf16ps for 32+ rows, else " + name;
            return name;
        }
        case Isa::avx512_vnni:
        case Isa::avx512: return "avx512: bf16->fp32 fma";
        case Isa::avx2: return "avx2: bf16->fp32 fma";
        case Isa::scalar: break;
    }
    return "scalar: fp32";
}

}  // namespace ironlm
