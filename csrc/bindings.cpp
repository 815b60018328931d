// Python bindings: the only file that includes nanobind. Kernels release the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <vector>

#include "dispatch.h"
#include "gemm.h"
#include "graph.h"
#include "ops.h"
#include "quantize.h"
#include "repack.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace ironlm;

namespace {

// Tensors cross as raw addresses plus strides: torch's __dlpack__ costs about 3 us per tensor,
// which at ~200 kernel calls per token of a small model is a large share of decode time. The
// Python wrappers (ironlm/quant/linear.py, ironlm/kernels.py) check dtypes, shapes and strides.
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

DType dt(bool bf16) { return bf16 ? DType::bf16 : DType::f32; }

// How every kernel binding runs a call: checks the data the call reads (values that change from step to
// step, so a graph checks them again on each replay), records the call if this thread is capturing a
// KernelGraph, then runs it without the GIL. check and run hold their arguments by value.
template <typename Check, typename Run>
void launch(Check check, Run run) {
    check();
    if (KernelGraph* graph = capturing_graph()) graph->add({check, run});
    nb::gil_scoped_release release;
    run();
}

template <typename Run>
void launch(Run run) {
    if (KernelGraph* graph = capturing_graph()) graph->add({nullptr, run});
    nb::gil_scoped_release release;
    run();
}

void check(bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(what);
}

// A KV cache's element type from Python: 0 float32, 1 bfloat16, 2 int8 (which needs its scales).
DType kv_dt(int code, uintptr_t k_scale, uintptr_t v_scale) {
    check(code >= 0 && code <= 2, "KV cache dtype code must be 0 (float32), 1 (bfloat16) or 2 (int8)");
    check(code != 2 || (k_scale && v_scale), "an int8 KV cache needs its K and V scales");
    return static_cast<DType>(code);
}

void gemm_py(int fmt, uintptr_t w, int64_t n, int64_t k_padded, int64_t m, int64_t k, uintptr_t x, int64_t ldx,
             bool x_bf16, uintptr_t y, int64_t ldy, bool y_bf16, uintptr_t bias) {
    check(fmt >= 0 && fmt <= 3, "gemm: unknown weight format");
    check(k_padded > 0 && k_padded % kBlock == 0 && k <= k_padded && k_padded - k < kBlock, "gemm: bad k / k_padded");
    check(m >= 0 && n >= 0 && ldx >= k && ldy >= n, "gemm: bad shape or row stride");
    if (m == 0 || n == 0) return;
    GemmArgs a{fmt, ptr<const uint8_t>(w), n, k_padded, m, k, ptr<const void>(x), ldx, x_bf16,
               ptr<void>(y), ldy, y_bf16, ptr<const float>(bias)};
    launch([a] { gemm(a); });
}

void rms_norm_py(int64_t rows, int64_t dim, uintptr_t x, int64_t ldx, int64_t x_group, int64_t ldx_group, bool x_bf16,
                 uintptr_t residual, int64_t ldr, bool r_bf16, uintptr_t weight, bool w_bf16, uintptr_t out, int64_t ldo,
                 bool o_bf16, float eps) {
    check(rows >= 0 && dim > 0 && ldx >= dim && ldo >= dim && (!residual || ldr >= dim), "rms_norm: bad shape or stride");
    check(x_group > 0 && (rows <= x_group || ldx_group >= x_group * ldx), "rms_norm: bad row groups");
    NormArgs a{rows, dim, ptr<const void>(x), ldx, x_group, ldx_group, dt(x_bf16), ptr<void>(residual), ldr, dt(r_bf16),
               ptr<const void>(weight), dt(w_bf16), ptr<void>(out), ldo, dt(o_bf16), eps};
    launch([a] { ops().rms_norm(a); });
}

void silu_mul_py(int64_t rows, int64_t inter, uintptr_t gate_up, int64_t ldg, bool g_bf16, uintptr_t out, int64_t ldo,
                 bool o_bf16) {
    check(rows >= 0 && inter > 0 && ldg >= 2 * inter && ldo >= inter, "silu_mul: bad shape or stride");
    SiluMulArgs a{rows, inter, ptr<const void>(gate_up), ldg, dt(g_bf16), ptr<void>(out), ldo, dt(o_bf16)};
    launch([a] { ops().silu_mul(a); });
}

void rope_py(int64_t tokens, int64_t dim, int64_t rot_dim, uintptr_t q, int64_t q_heads, int64_t q_token_stride,
             int64_t q_head_stride, bool q_bf16, uintptr_t k, int64_t k_heads, int64_t k_token_stride,
             int64_t k_head_stride, bool k_bf16, uintptr_t positions, uintptr_t cos, uintptr_t sin, int64_t max_positions) {
    check(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= dim, "rope: bad rot_dim");
    RopeArgs a{tokens, dim, rot_dim, ptr<void>(q), q_heads, q_token_stride, q_head_stride, dt(q_bf16),
               ptr<void>(k), k_heads, k_token_stride, k_head_stride, dt(k_bf16), ptr<const int64_t>(positions),
               ptr<const float>(cos), ptr<const float>(sin)};
    auto check_positions = [a, max_positions] {
        for (int64_t i = 0; i < a.tokens; ++i)
            check(a.positions[i] >= 0 && a.positions[i] < max_positions, "rope: position outside the cos/sin cache");
    };
    launch(check_positions, [a] { ops().rope(a); });
}

void attention_py(int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                  int64_t max_blocks, int64_t num_blocks, uintptr_t q, bool q_bf16, int64_t q_stride_b,
                  int64_t q_stride_h, uintptr_t k_cache, uintptr_t v_cache, int kv_dtype, uintptr_t k_scale,
                  uintptr_t v_scale, uintptr_t block_tables,
                  uintptr_t context_lens, float scale, uintptr_t out, bool o_bf16) {
    check(kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim <= 256,
          "paged_attention_decode: H must be a multiple of KVH and head_dim at most 256");
    AttentionArgs a{batch, heads, kv_heads, head_dim, block_size, max_blocks, ptr<const void>(q), dt(q_bf16),
                    q_stride_b, q_stride_h, ptr<const void>(k_cache), ptr<const void>(v_cache),
                    kv_dt(kv_dtype, k_scale, v_scale), ptr<const float>(k_scale), ptr<const float>(v_scale),
                    ptr<const int32_t>(block_tables), ptr<const int32_t>(context_lens), scale, ptr<void>(out),
                    dt(o_bf16)};
    auto check_tables = [a, num_blocks] {
        for (int64_t b = 0; b < a.batch; ++b) {
            const int64_t len = a.context_lens[b];
            check(len >= 0 && len <= a.max_blocks * a.block_size,
                  "paged_attention_decode: context length exceeds the block table");
            for (int64_t i = 0; i < (len + a.block_size - 1) / a.block_size; ++i) {
                const int32_t blk = a.block_tables[b * a.max_blocks + i];
                check(blk >= 0 && blk < num_blocks, "paged_attention_decode: block table entry outside the cache");
            }
        }
    };
    launch(check_tables, [a] { ops().attention(a); });
}

void kv_write_py(int64_t tokens, int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t num_blocks,
                 uintptr_t k, int64_t k_stride_t, int64_t k_stride_h, bool k_bf16, uintptr_t v, int64_t v_stride_t,
                 int64_t v_stride_h, bool v_bf16, uintptr_t k_cache, uintptr_t v_cache, int kv_dtype, uintptr_t k_scale,
                 uintptr_t v_scale, uintptr_t slots) {
    check(kv_heads > 0 && head_dim > 0 && head_dim <= 256 && block_size > 0, "kv_write: bad cache shape (head_dim at most 256)");
    KvWriteArgs a{tokens, kv_heads, head_dim, block_size, ptr<const void>(k), k_stride_t, k_stride_h, dt(k_bf16),
                  ptr<const void>(v), v_stride_t, v_stride_h, dt(v_bf16), ptr<void>(k_cache), ptr<void>(v_cache),
                  kv_dt(kv_dtype, k_scale, v_scale), ptr<float>(k_scale), ptr<float>(v_scale),
                  ptr<const int64_t>(slots)};
    auto check_slots = [a, num_blocks] {
        for (int64_t i = 0; i < a.tokens; ++i)
            check(a.slots[i] >= 0 && a.slots[i] < num_blocks * a.block_size, "kv_write: slot outside the cache");
    };
    launch(check_slots, [a] { ops().kv_write(a); });
}

void prefill_attention_py(int64_t q_len, int64_t context, int64_t heads, int64_t kv_heads, int64_t head_dim,
                          uintptr_t q, int64_t q_stride_t, int64_t q_stride_h, bool q_bf16, uintptr_t k,
                          int64_t k_stride_t, int64_t k_stride_h, bool k_bf16, uintptr_t v, int64_t v_stride_t,
                          int64_t v_stride_h, bool v_bf16, float scale, uintptr_t out, bool o_bf16) {
    check(kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim <= 256,
          "prefill_attention: H must be a multiple of KVH and head_dim at most 256");
    check(q_len > 0 && q_len <= context, "prefill_attention: need 0 < q_len <= context");
    PrefillAttentionArgs a{q_len, context, heads, kv_heads, head_dim, ptr<const void>(q), q_stride_t, q_stride_h,
                           dt(q_bf16), ptr<const void>(k), k_stride_t, k_stride_h, dt(k_bf16), ptr<const void>(v),
                           v_stride_t, v_stride_h, dt(v_bf16), scale, ptr<void>(out), dt(o_bf16), nullptr, 0,
                           nullptr, nullptr};
    launch([a] { ops().prefill_attention(a); });
}

void sample_py(int64_t rows, int64_t vocab, uintptr_t logits, int64_t ld, uintptr_t temperature, uintptr_t top_k,
               uintptr_t top_p, uintptr_t min_p, uintptr_t u, uintptr_t out) {
    check(rows >= 0 && vocab > 0 && vocab <= kMaxSampleVocab && ld >= vocab, "sample: bad shape, or a vocabulary over 2^20");
    SampleArgs a{rows, vocab, ptr<float>(logits), ld, ptr<const float>(temperature), ptr<const int64_t>(top_k),
                 ptr<const float>(top_p), ptr<const float>(min_p), ptr<const double>(u), ptr<int64_t>(out)};
    auto check_params = [a] {
        for (int64_t r = 0; r < a.rows; ++r) {
            check(a.temperature[r] > 0.0f && a.top_k[r] >= 0, "sample: temperature must be > 0 and top_k >= 0");
            check(a.top_p[r] > 0.0f && a.top_p[r] <= 1.0f && a.min_p[r] >= 0.0f && a.min_p[r] <= 1.0f,
                  "sample: top_p must be in (0, 1] and min_p in [0, 1]");
            check(a.u[r] >= 0.0 && a.u[r] < 1.0, "sample: u must be in [0, 1)");
        }
    };
    launch(check_params, [a] { ops().sample(a); });
}

void repetition_penalty_py(int64_t count, int64_t batch, int64_t vocab, uintptr_t logits, int64_t ld, uintptr_t rows,
                           uintptr_t offsets, uintptr_t ids, uintptr_t penalty) {
    check(count >= 0 && batch >= 0 && vocab > 0 && ld >= vocab, "repetition_penalty: bad shape or stride");
    PenaltyArgs a{count, vocab, ptr<float>(logits), ld, ptr<const int64_t>(rows), ptr<const int64_t>(offsets),
                  ptr<const int64_t>(ids), ptr<const float>(penalty)};
    auto check_ids = [a, batch] {
        check(a.count == 0 || a.offsets[0] == 0, "repetition_penalty: offsets must start at 0");
        for (int64_t i = 0; i < a.count; ++i) {
            check(a.rows[i] >= 0 && a.rows[i] < batch, "repetition_penalty: a row outside the batch");
            check(a.penalty[i] > 0.0f, "repetition_penalty: penalties must be > 0");
            check(a.offsets[i + 1] >= a.offsets[i], "repetition_penalty: offsets must not decrease");
            for (int64_t j = a.offsets[i]; j < a.offsets[i + 1]; ++j)
                check(a.ids[j] >= 0 && a.ids[j] < a.vocab, "repetition_penalty: a token id outside the vocabulary");
        }
    };
    launch(check_ids, [a] { ops().repetition_penalty(a); });
}

void prefill_attention_paged_py(int64_t q_len, int64_t context, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                uintptr_t q, int64_t q_stride_t, int64_t q_stride_h, bool q_bf16, int64_t block_size,
                                int64_t num_blocks, uintptr_t k_cache, uintptr_t v_cache, int kv_dtype,
                                uintptr_t k_scale, uintptr_t v_scale, uintptr_t block_table, int64_t table_len,
                                float scale, uintptr_t out, bool o_bf16) {
    check(kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim <= 256 && block_size > 0,
          "prefill_attention: H must be a multiple of KVH and head_dim at most 256");
    check(q_len > 0 && q_len <= context, "prefill_attention: need 0 < q_len <= context");
    check(context <= table_len * block_size, "prefill_attention: context exceeds the block table");
    const int32_t* table = ptr<const int32_t>(block_table);
    const DType kv = kv_dt(kv_dtype, k_scale, v_scale);
    PrefillAttentionArgs a{q_len, context, heads, kv_heads, head_dim, ptr<const void>(q), q_stride_t, q_stride_h,
                           dt(q_bf16), ptr<const void>(k_cache), 0, 0, kv, ptr<const void>(v_cache), 0, 0, kv, scale,
                           ptr<void>(out), dt(o_bf16), table, block_size, ptr<const float>(k_scale),
                           ptr<const float>(v_scale)};
    auto check_table = [a, num_blocks] {
        for (int64_t i = 0; i < (a.context + a.block_size - 1) / a.block_size; ++i)
            check(a.block_table[i] >= 0 && a.block_table[i] < num_blocks,
                  "prefill_attention: block table entry outside the cache");
    };
    launch(check_table, [a] { ops().prefill_attention(a); });
}

void repack_ggml_py(int fmt, uintptr_t src, int64_t src_row_bytes, int64_t n, int64_t k, uintptr_t dst) {
    check(fmt >= 0 && fmt <= 2, "repack_ggml: fmt must be int8, int4 or int4_sym");
    check(n >= 0 && k > 0 && k % kBlock == 0, "repack_ggml: k must be a positive multiple of 32");
    check(!capturing_graph(), "repack_ggml: a load-time call, not recordable in a kernel graph");
    nb::gil_scoped_release release;
    repack_ggml(fmt, ptr<const uint8_t>(src), src_row_bytes, n, k, ptr<uint8_t>(dst));
}

void quantize_pack_py(int fmt, uintptr_t src, int64_t ld, bool src_bf16, int64_t n, int64_t k, uintptr_t dst) {
    check(fmt >= 0 && fmt <= 2, "quantize_pack: fmt must be int8, int4 or int4_sym");
    check(n >= 0 && k > 0 && ld >= k, "quantize_pack: bad shape or row stride");
    check(!capturing_graph(), "quantize_pack: a load-time call, not recordable in a kernel graph");
    nb::gil_scoped_release release;
    quantize_pack(fmt, ptr<const void>(src), src_bf16, ld, n, k, ptr<uint8_t>(dst));
}

// Features named as cpu_features() reports them (absent ones false), for supported_isas() of another CPU.
CpuFeatures features_from(const nb::dict& d) {
    CpuFeatures f;
    for (auto [key, value] : d) {
        const std::string k = nb::cast<std::string>(key);
        const int truth = PyObject_IsTrue(value.ptr());
        if (truth < 0) throw nb::python_error();  // a value whose truth cannot be told
        const bool v = truth == 1;
        if (k == "avx2") f.avx2 = f.fma = f.os_avx = v;
        else if (k == "f16c") f.f16c = v;
        else if (k == "avx512f") f.avx512f = f.os_avx512 = v;
        else if (k == "avx512bw") f.avx512bw = v;
        else if (k == "avx512vl") f.avx512vl = v;
        else if (k == "avx512dq") f.avx512dq = v;
        else if (k == "avx512_vnni") f.avx512_vnni = v;
        else if (k == "avx512_bf16") f.avx512_bf16 = v;
        else if (k == "avx_vnni") f.avx_vnni = v;
        else if (k == "amx_tile") f.amx_tile = v;
        else if (k == "amx_int8") f.amx_int8 = v;
        else if (k == "amx_bf16") f.amx_bf16 = v;
        else if (k == "amx_os_enabled") f.os_amx = v;
        else if (k == "amx_permitted") f.amx_permitted = v;
        else throw std::invalid_argument("supported_isas: unknown feature " + k);
    }
    return f;
}

}  // namespace

NB_MODULE(_kernels, m) {
    m.def("cpu_features", []() {
        const CpuFeatures& f = cpu_features();
        nb::dict d;
        d["avx2"] = f.avx2 && f.fma && f.os_avx;
        d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f && f.os_avx512;
        d["avx512bw"] = f.avx512bw && f.os_avx512;
        d["avx512vl"] = f.avx512vl && f.os_avx512;
        d["avx512dq"] = f.avx512dq && f.os_avx512;
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
    m.def("supported_isas", [](std::optional<nb::dict> features) {
        const CpuFeatures f = features ? features_from(*features) : cpu_features();
        std::vector<std::string> names;
        for (int i = 0; i <= static_cast<int>(Isa::amx); ++i)
            if (isa_supported(f, static_cast<Isa>(i))) names.push_back(isa_name(static_cast<Isa>(i)));
        return names;
    }, nb::arg("features") = nb::none(),
       "The ISA levels this CPU and OS can run, lowest first (set_isa or IRONLM_ISA picks one); with `features`\n"
       "(named as cpu_features() names them, absent ones false), those a CPU with just those features could run.");
    m.def("active_isa", []() {
        std::string why;
        const Isa chosen = active_isa(&why);
        const Isa now = current_isa();
        if (now != chosen) why = "set by ironlm._kernels.set_isa";
        return std::make_pair(std::string(isa_name(now)), why);
    }, "(level, reason): the ISA level the kernels use now.");
    m.def("set_isa", [](const std::string& name) {
        Isa isa;
        if (!parse_isa(name, &isa)) throw std::invalid_argument("set_isa: unknown level " + name);
        if (!set_isa(isa)) throw std::invalid_argument("set_isa: this CPU/OS cannot run " + name);
    }, nb::arg("name"), "Switch every kernel to ISA level `name` (one of supported_isas()).");
    m.def("set_num_threads", [](int n) { set_num_threads(n); }, nb::arg("n"), "Resize the kernel thread pool.");
    m.def("num_threads", []() { return num_threads(); });
    m.def("gemm_kernel_name", &gemm_kernel_name, nb::arg("fmt"));
    m.def("set_bf16_dot", [](const std::string& name) {
        Bf16Dot mode;
        if (!parse_bf16_dot(name, &mode)) throw std::invalid_argument("set_bf16_dot: use auto, on or off, not " + name);
        set_bf16_dot(mode);
    }, nb::arg("mode"), "Whether bf16 products use vdpbf16ps where AVX512-BF16 is in use: auto, on or off.");
    m.def("bf16_dot", []() {
        return std::make_pair(bf16_dot_in_use(), bf16_dot_ratio());
    }, "(in use, measured vdpbf16ps / fp32 FMA rate): whether bf16 products run on vdpbf16ps now.");
    m.def("prefetch_into_l2", &prefetch_into_l2,
          "Whether decode GEMMs and attention prefetch into L2 rather than L1 (AMD, or IRONLM_PREFETCH=l1|l2).");
    m.def("bf16_gemm_rounds", &bf16_gemm_rounds, nb::arg("m"),
          "Whether the bf16 GEMM of the current level rounds m rows of activations to bf16.");
    // Raw-address kernels: call them through ironlm.quant.QuantLinear and ironlm.kernels.
    nb::class_<KernelGraph>(m, "KernelGraph", "Kernel calls recorded from one thread, replayed in order from C++.")
        .def(nb::init<>())
        .def("begin_capture", &KernelGraph::begin_capture)
        .def("end_capture", &KernelGraph::end_capture)
        .def("replay", &KernelGraph::replay, nb::call_guard<nb::gil_scoped_release>())
        .def("__len__", &KernelGraph::size);
    m.def("gemm", &gemm_py);
    m.def("rms_norm", &rms_norm_py);
    m.def("silu_mul", &silu_mul_py);
    m.def("rope", &rope_py);
    m.def("paged_attention_decode", &attention_py);
    m.def("prefill_attention", &prefill_attention_py);
    m.def("prefill_attention_paged", &prefill_attention_paged_py);
    m.def("kv_write", &kv_write_py);
    m.def("sample", &sample_py);
    m.def("repetition_penalty", &repetition_penalty_py);
    m.def("repack_ggml", &repack_ggml_py);
    m.def("quantize_pack", &quantize_pack_py);
}
