// One cache line's software prefetch, into L1 or into L2 only: which suits the memory-bound kernels depends on
// the CPU (prefetch_into_l2, dispatch.h). Static, so that each translation unit keeps its own copy whatever the
// ISA flags it is compiled with.
#pragma once

static inline void prefetch_line(const void* p, bool l2) {
    if (l2) __builtin_prefetch(p, 0, 1);
    else __builtin_prefetch(p, 0, 3);
}
