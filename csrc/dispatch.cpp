#include "dispatch.h"

#include <atomic>
#include <cpuid.h>
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

Isa best_isa(const CpuFeatures& f) {
    if (!(f.avx2 && f.fma && f.os_avx)) return Isa::scalar;
    if (!(f.avx512f && f.avx512bw && f.avx512vl && f.os_avx512)) return Isa::avx2;
    if (!f.avx512_vnni) return Isa::avx512;
    if (!f.avx512_bf16) return Isa::avx512_vnni;
    if (!(f.amx_tile && f.amx_int8 && f.amx_bf16 && f.amx_permitted)) return Isa::avx512_bf16;
    return Isa::amx;
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::scalar: return "scalar";
        case Isa::avx2: return "avx2";
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
        if (wanted <= best) {
            if (why) *why = std::string("forced by IRONLM_ISA=") + env;
            return wanted;
        }
        if (why) *why = std::string("IRONLM_ISA=") + env + " is above what this CPU/OS allows; using " + isa_name(best);
        return best;
    }
    if (why) {
        *why = "best level this CPU and OS support";
        if (f.amx_tile && !f.amx_permitted) *why += " (AMX present but not enabled by the OS)";
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
    if (isa > best_isa(cpu_features())) return false;
    current_level().store(static_cast<int>(isa), std::memory_order_relaxed);
    return true;
}

}  // namespace ironlm
