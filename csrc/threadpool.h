// One process-wide pool of worker threads for the kernels (std::thread, not OpenMP, so it never
// shares a runtime with PyTorch's libgomp). Workers spin briefly after each job, then sleep.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ironlm {

// Work on items [begin, end) of a job.
using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);

// Runs fn over [0, n) in contiguous chunks claimed by the pool threads and the caller.
// Runs serially when the pool is busy (another Python thread) or n is 1.
void parallel_for(int64_t n, RangeFn fn, void* ctx);
void set_num_threads(int n);
int num_threads();

// 64-byte aligned scratch memory for the kernels.
void* scratch_alloc(size_t bytes);
void scratch_free(void* p);

}  // namespace ironlm
