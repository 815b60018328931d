// `ironlm._probes`: memory bandwidth and peak arithmetic of this machine, measured with plain std::threads.
// Python (ironlm/bench/probes.py) picks the ISA from ironlm._kernels.cpu_features(); the checks here only turn a
// wrong choice into an error instead of an illegal instruction.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "probe.h"

namespace nb = nanobind;

namespace ironlm::probe {

uint64_t read_scalar(const uint8_t* p, size_t n, bool) {
    uint64_t sum = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v;
        std::memcpy(&v, p + i, 8);
        sum += v;
    }
    for (; i < n; ++i) sum += p[i];
    return sum;
}

namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kAlign = 2 << 20;  // 2 MiB: lets the kernel back the buffer with huge pages

struct Buffer {
    uint8_t* data = nullptr;
    explicit Buffer(size_t n) {
        const size_t rounded = (n + kAlign - 1) / kAlign * kAlign;
        data = static_cast<uint8_t*>(std::aligned_alloc(kAlign, rounded));
        if (!data) throw std::runtime_error("probe: cannot allocate " + std::to_string(n) + " bytes");
        madvise(data, rounded, MADV_HUGEPAGE);
    }
    ~Buffer() { std::free(data); }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
};

// Run body(thread_index) on `threads` threads started together; return the wall seconds from start to last finish.
double run_parallel(int threads, const std::function<void(int)>& body) {
    std::atomic<bool> go{false};
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
            body(t);
        });
    }
    const auto start = Clock::now();
    go.store(true, std::memory_order_release);
    for (auto& th : pool) th.join();
    return std::chrono::duration<double>(Clock::now() - start).count();
}

// Thread t's slice [begin, end) of n bytes, 64-byte aligned.
std::pair<size_t, size_t> slice(size_t n, int threads, int t) {
    const size_t per = (n / threads) & ~size_t(63);
    const size_t begin = per * t;
    return {begin, t == threads - 1 ? n : begin + per};
}

void check_args(size_t size_bytes, int threads, int repeats) {
    if (threads < 1 || threads > 4096) throw std::invalid_argument("probe: threads must be in 1..4096");
    if (repeats < 1) throw std::invalid_argument("probe: repeats must be >= 1");
    if (size_bytes < size_t(64) * threads) throw std::invalid_argument("probe: size_bytes too small for the threads");
}

using ReadFn = uint64_t (*)(const uint8_t*, size_t, bool);

ReadFn read_kernel(const std::string& isa) {
    if (isa == "scalar") return read_scalar;
    if (isa == "avx2") {
        if (!__builtin_cpu_supports("avx2")) throw std::invalid_argument("probe: CPU lacks AVX2");
        return read_avx2;
    }
    if (isa == "avx512") {
        if (!__builtin_cpu_supports("avx512f")) throw std::invalid_argument("probe: CPU lacks AVX-512F");
        return read_avx512;
    }
    throw std::invalid_argument("probe: unknown read isa '" + isa + "' (scalar, avx2, avx512)");
}

// Best read bandwidth in GB/s (1e9 bytes/s) over `repeats` passes over a buffer of size_bytes, the passes
// prefetching into L1 and into L2 in turns: the kernels use whichever reads faster (dispatch.h), and the roofline
// holds them to the faster of the two.
double read_bandwidth(size_t size_bytes, int threads, int repeats, const std::string& isa) {
    check_args(size_bytes, threads, repeats);
    const ReadFn fn = read_kernel(isa);
    Buffer buf(size_bytes);
    // First touch by the thread that will read the slice (NUMA placement).
    run_parallel(threads, [&](int t) {
        auto [b, e] = slice(size_bytes, threads, t);
        std::memset(buf.data + b, t + 1, e - b);
    });
    std::vector<uint64_t> sums(threads * 8);  // 64 bytes apart: no false sharing
    double best = 1e30;
    nb::gil_scoped_release release;
    for (int r = 0; r < repeats; ++r) {
        const double s = run_parallel(threads, [&](int t) {
            auto [b, e] = slice(size_bytes, threads, t);
            sums[t * 8] += fn(buf.data + b, e - b, r % 2 == 1);
        });
        best = std::min(best, s);
    }
    return size_bytes / best / 1e9;
}

// Best copy bandwidth in GB/s, STREAM convention: bytes read + bytes written. Uses two buffers of size_bytes / 2.
double copy_bandwidth(size_t size_bytes, int threads, int repeats) {
    check_args(size_bytes, threads, repeats);
    const size_t half = size_bytes / 2;
    Buffer src(half), dst(half);
    run_parallel(threads, [&](int t) {
        auto [b, e] = slice(half, threads, t);
        std::memset(src.data + b, t + 1, e - b);
        std::memset(dst.data + b, 0, e - b);
    });
    double best = 1e30;
    nb::gil_scoped_release release;
    for (int r = 0; r < repeats; ++r) {
        const double s = run_parallel(threads, [&](int t) {
            auto [b, e] = slice(half, threads, t);
            std::memcpy(dst.data + b, src.data + b, e - b);
        });
        best = std::min(best, s);
    }
    return 2.0 * half / best / 1e9;
}

// Best GOP/s over `repeats` runs of `iters` rounds of the named micro-kernel on every thread.
double peak_gops(const std::string& kind, int threads, int64_t iters, int repeats) {
    check_args(size_t(64) * threads, threads, repeats);
    if (iters < 1) throw std::invalid_argument("probe: iters must be >= 1");
    std::function<double(float*, int32_t*)> kernel;
    if (kind == "fp32_avx2") {
        if (!__builtin_cpu_supports("fma")) throw std::invalid_argument("probe: CPU lacks FMA");
        kernel = [iters](float* f, int32_t*) { return fp32_fma_avx2(iters, f); };
    } else if (kind == "fp32_avx512") {
        if (!__builtin_cpu_supports("avx512f")) throw std::invalid_argument("probe: CPU lacks AVX-512F");
        kernel = [iters](float* f, int32_t*) { return fp32_fma_avx512(iters, f); };
    } else if (kind == "bf16_avx512") {
        if (!__builtin_cpu_supports("avx512bf16")) throw std::invalid_argument("probe: CPU lacks AVX512-BF16");
        kernel = [iters](float* f, int32_t*) { return bf16_dot_avx512(iters, f); };
    } else if (kind == "int8_avx512") {
        if (!__builtin_cpu_supports("avx512vnni")) throw std::invalid_argument("probe: CPU lacks AVX512-VNNI");
        kernel = [iters](float*, int32_t* i) { return int8_dot_avx512(iters, i); };
    } else if (kind == "int8_avx2") {
        if (!__builtin_cpu_supports("avx2")) throw std::invalid_argument("probe: CPU lacks AVX2");
        kernel = [iters](float*, int32_t* i) { return int8_dot_avx2(iters, i); };
    } else if (kind == "int8_avxvnni") {
        if (!__builtin_cpu_supports("avxvnni")) throw std::invalid_argument("probe: CPU lacks AVX-VNNI");
        kernel = [iters](float*, int32_t* i) { return int8_dot_avxvnni(iters, i); };
    } else {
        throw std::invalid_argument("probe: unknown kind '" + kind +
                                    "' (fp32_avx2, fp32_avx512, bf16_avx512, int8_avx512, int8_avxvnni, int8_avx2)");
    }
    std::vector<double> ops(threads * 8, 0.0);
    std::vector<float> fsink(threads * 16);
    std::vector<int32_t> isink(threads * 16);
    double best = 0.0;
    nb::gil_scoped_release release;
    for (int r = 0; r < repeats; ++r) {
        const double s = run_parallel(threads, [&](int t) { ops[t * 8] = kernel(&fsink[t * 16], &isink[t * 16]); });
        double total = 0.0;
        for (int t = 0; t < threads; ++t) total += ops[t * 8];
        best = std::max(best, total / s / 1e9);
    }
    return best;
}

}  // namespace
}  // namespace ironlm::probe

NB_MODULE(_probes, m) {
    using namespace ironlm::probe;
    m.def("read_bandwidth", &read_bandwidth, nb::arg("size_bytes"), nb::arg("threads"), nb::arg("repeats"),
          nb::arg("isa"), "Best read bandwidth in GB/s over `repeats` passes (isa: scalar, avx2, avx512).");
    m.def("copy_bandwidth", &copy_bandwidth, nb::arg("size_bytes"), nb::arg("threads"), nb::arg("repeats"),
          "Best copy bandwidth in GB/s (read + written bytes) over `repeats` passes.");
    m.def("peak_gops", &peak_gops, nb::arg("kind"), nb::arg("threads"), nb::arg("iters"), nb::arg("repeats"),
          "Best arithmetic rate in G operations/s (a multiply-add counts 2) of one micro-kernel on every thread.");
}
