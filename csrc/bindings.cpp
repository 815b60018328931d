// Python bindings: the only file that includes nanobind.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/pair.h>

#include "dispatch.h"

namespace nb = nanobind;
using namespace ironlm;

NB_MODULE(_kernels, m) {
    m.def("cpu_features", []() {
        const CpuFeatures& f = cpu_features();
        nb::dict d;
        d["avx2"] = f.avx2 && f.fma && f.os_avx;
        d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f && f.os_avx512;
        d["avx512bw"] = f.avx512bw && f.os_avx512;
        d["avx512vl"] = f.avx512vl && f.os_avx512;
        d["avx512_vnni"] = f.avx512_vnni && f.os_avx512;
        d["avx512_bf16"] = f.avx512_bf16 && f.os_avx512;
        d["avx_vnni"] = f.avx_vnni && f.os_avx;
        d["amx_tile"] = f.amx_tile;
        d["amx_int8"] = f.amx_int8;
        d["amx_bf16"] = f.amx_bf16;
        d["amx_os_enabled"] = f.os_amx;
        d["amx_permitted"] = f.amx_permitted;
        return d;
    });
    m.def("best_isa", []() { return std::string(isa_name(best_isa(cpu_features()))); });
    m.def("active_isa", []() {
        std::string why;
        const Isa isa = active_isa(&why);
        return std::make_pair(std::string(isa_name(isa)), why);
    });
}
