#include "dispatch.h"
#include "probe.h"

#include <atomic>
#include <chrono>
#include <cpuid.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unistd.h>
#include <sys/syscall.h>

namespace ironlm {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask Linux to enable a state component
constexpr int kXfeatureXtiledata = 18;

unsigned long long xgetbv0() {
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (static_cast<unsigned long long>(hi) << 32) | lo;
}

CpuFeatures detect() {
    CpuFeatures f;
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = c & (1u << 27);
    f.fma = c & (1u << 12);
    f.f16c = c & (1u << 29);
    if (osxsave) {
        const unsigned long long xcr0 = xgetbv0();
        f.os_avx = (xcr0 & 0x6) == 0x6;                    // XMM + YMM
        f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;   // opmask + ZMM halves
        f.os_amx = (xcr0 & 0x60000) == 0x60000;            // XTILECFG + XTILEDATA
    }
    if (__get_cpuid_max(0, nullptr) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        f.avx2 = b & (1u << 5);
        f.avx512f = b & (1u << 16);
        f.avx512dq = b & (1u << 17);
        f.avx512bw = b & (1u << 30);
        f.avx512vl = b & (1u << 31);
        f.avx512_vnni = c & (1u << 11);
        f.amx_bf16 = d & (1u << 22);
        f.amx_tile = d & (1u << 24);
        f.amx_int8 = d & (1u << 25);
        __cpuid_count(7, 1, a, b, c, d);
        f.avx_vnni = a & (1u << 4);
        f.avx512_bf16 = a & (1u << 5);
    }
    if (f.amx_tile && f.os_amx) {
        // Linux keeps AMX tile data off until a process asks for it.
        f.amx_permitted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    }
    return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
    static const CpuFeatures f = detect();  // immutable after first call
    return f;
}

bool isa_supported(const CpuFeatures& f, Isa isa) {
    const bool avx2 = f.avx2 && f.fma && f.f16c && f.os_avx;
    const bool avx512 = avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.os_avx512;
    switch (isa) {
        case Isa::scalar: return true;
        case Isa::avx2: return avx2;
        case Isa::avx_vnni: return avx2 && (f.avx_vnni || (avx512 && f.avx512_vnni));
        case Isa::avx512: return avx512;
        case Isa::avx512_vnni: return avx512 && f.avx512_vnni;
        case Isa::avx512_bf16: return avx512 && f.avx512_vnni && f.avx512_bf16;
        case Isa::amx:
            return avx512 && f.avx512_vnni && f.avx512_bf16 && f.amx_tile && f.amx_int8 && f.amx_bf16 && f.amx_permitted;
    }
    return false;
}

Isa best_isa(const CpuFeatures& f) {
    for (int i = static_cast<int>(Isa::amx); i > 0; --i)
        if (isa_supported(f, static_cast<Isa>(i))) return static_cast<Isa>(i);
    return Isa::scalar;
}

bool avx_vnni_evex(const CpuFeatures& f) { return !(f.avx_vnni && f.os_avx); }

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::scalar: return "scalar";
        case Isa::avx2: return "avx2";
        case Isa::avx_vnni: return "avx_vnni";
        case Isa::avx512: return "avx512";
        case Isa::avx512_vnni: return "avx512_vnni";
        case Isa::avx512_bf16: return "avx512_bf16";
        case Isa::amx: return "amx";
    }
    return "unknown";
}

bool parse_isa(const std::string& name, Isa* out) {
    for (int i = 0; i <= static_cast<int>(Isa::amx); ++i) {
        if (name == isa_name(static_cast<Isa>(i))) {
            *out = static_cast<Isa>(i);
            return true;
        }
    }
    return false;
}

Isa active_isa(std::string* why) {
    const CpuFeatures& f = cpu_features();
    const Isa best = best_isa(f);
    const char* env = std::getenv("IRONLM_ISA");
    Isa wanted;
    if (env && *env && parse_isa(env, &wanted)) {
        if (isa_supported(f, wanted)) {
            if (why) *why = std::string("forced by IRONLM_ISA=") + env;
            return wanted;
        }
        if (why) *why = std::string("IRONLM_ISA=") + env + " is not supported by this CPU/OS; using " + isa_name(best);
        return best;
    }
    if (why) {
        *why = "best level this CPU and OS support";
        if (f.amx_tile && !f.amx_permitted) *why += " (AMX present but not enabled by the OS)";
        if (env && *env) {
            *why += std::string("; IRONLM_ISA=") + env + " is not a level (";
            for (int i = 0; i <= static_cast<int>(Isa::amx); ++i)
                *why += std::string(i ? ", " : "") + isa_name(static_cast<Isa>(i));
            *why += ")";
        }
    }
    return best;
}

namespace {
std::atomic<int>& current_level() {
    static std::atomic<int> level{static_cast<int>(active_isa())};
    return level;
}
}  // namespace

Isa current_isa() { return static_cast<Isa>(current_level().load(std::memory_order_relaxed)); }

bool set_isa(Isa isa) {
    if (!isa_supported(cpu_features(), isa)) return false;
    current_level().store(static_cast<int>(isa), std::memory_order_relaxed);
    return true;
}

namespace {

double measure_bf16_dot_ratio() {
    // Best of three short runs of each (about 0.2 ms in all), taken in turns, so a preemption or a frequency
    // change hits one run only. The probes' loops: 12 independent chains of one instruction each.
    using Clock = std::chrono::steady_clock;
    constexpr int64_t kIters = 4096;
    double best_dot = 0.0, best_fma = 0.0;
    float sink = 0.0f;
    for (int round = 0; round < 3; ++round) {
        const auto t0 = Clock::now();
        const double dot_ops = probe::bf16_dot_avx512(kIters, &sink);
        const auto t1 = Clock::now();
        const double fma_ops = probe::fp32_fma_avx512(kIters, &sink);
        const auto t2 = Clock::now();
        const double dot_s = std::chrono::duration<double>(t1 - t0).count();
        const double fma_s = std::chrono::duration<double>(t2 - t1).count();
        if (dot_s > 0 && dot_ops / dot_s > best_dot) best_dot = dot_ops / dot_s;
        if (fma_s > 0 && fma_ops / fma_s > best_fma) best_fma = fma_ops / fma_s;
    }
    return best_fma > 0 ? best_dot / best_fma : 0.0;
}

Bf16Dot bf16_dot_from_env() {
    Bf16Dot mode = Bf16Dot::automatic;
    const char* env = std::getenv("IRONLM_BF16_DOT");
    if (env && *env && !parse_bf16_dot(env, &mode))
        std::fprintf(stderr, "ironlm: IRONLM_BF16_DOT=%s is not auto, on or off; using auto\n", env);
    return mode;
}

std::atomic<int>& bf16_dot_setting() {
    static std::atomic<int> mode{static_cast<int>(bf16_dot_from_env())};
    return mode;
}

}  // namespace

bool parse_bf16_dot(const std::string& name, Bf16Dot* out) {
    if (name == "auto") *out = Bf16Dot::automatic;
    else if (name == "on") *out = Bf16Dot::on;
    else if (name == "off") *out = Bf16Dot::off;
    else return false;
    return true;
}

void set_bf16_dot(Bf16Dot mode) { bf16_dot_setting().store(static_cast<int>(mode), std::memory_order_relaxed); }

Bf16Dot bf16_dot_mode() { return static_cast<Bf16Dot>(bf16_dot_setting().load(std::memory_order_relaxed)); }

double bf16_dot_ratio() {
    if (best_isa(cpu_features()) < Isa::avx512_bf16) return 0.0;  // the probe's instructions would fault
    static const double ratio = measure_bf16_dot_ratio();  // immutable after first call
    return ratio;
}

namespace {

bool decide_prefetch_into_l2() {
    const char* env = std::getenv("IRONLM_PREFETCH");
    if (env && *env) {
        if (std::strcmp(env, "l1") == 0) return false;
        if (std::strcmp(env, "l2") == 0) return true;
        std::fprintf(stderr, "ironlm: IRONLM_PREFETCH=%s is not l1 or l2; using the CPU's default\n", env);
    }
    unsigned int max_leaf, vendor[3];
    __cpuid(0, max_leaf, vendor[0], vendor[2], vendor[1]);  // the name comes in EBX, EDX, ECX
    return std::memcmp(vendor, "AuthenticAMD", 12) == 0;
}

}  // namespace

bool prefetch_into_l2() {
    static const bool l2 = decide_prefetch_into_l2();  // immutable after first call
    return l2;
}

bool bf16_dot_in_use() {
    const Isa isa = current_isa();
    if (isa != Isa::avx512_bf16 && isa != Isa::amx) return false;
    switch (bf16_dot_mode()) {
        case Bf16Dot::on: return true;
        case Bf16Dot::off: return false;
        case Bf16Dot::automatic: break;
    }
    return bf16_dot_ratio() >= kBf16DotMinRatio;
}

}  // namespace ironlm
