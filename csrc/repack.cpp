// GGML Q8_0 / Q4_0 / Q4_1 rows straight into packed tiles (layout in kernels.h), one pass over
// the bytes so a GGUF model loads at memory speed. Bit-exact: bytes are moved, never requantized.
#include "repack.h"

#include <cstring>

#include "kernels.h"
#include "threadpool.h"

namespace ironlm {
namespace {

struct RepackJob {
    int fmt;
    const uint8_t* src;
    int64_t src_row_bytes, n, k;
    uint8_t* dst;
};

void repack_tiles(void* ctx, int64_t begin, int64_t end) {
    const RepackJob& j = *static_cast<const RepackJob*>(ctx);
    const int64_t kb = j.k / kBlock, tb = tile_block_bytes(j.fmt);
    const bool q8 = j.fmt == static_cast<int>(WeightFormat::int8);
    const bool with_min = j.fmt == static_cast<int>(WeightFormat::int4);
    const int64_t block_bytes = q8 ? 34 : with_min ? 20 : 18;  // GGML block sizes
    const int64_t qbytes = q8 ? 8 * 64 : 4 * 64;
    for (int64_t tile = begin; tile < end; ++tile) {
        for (int row = 0; row < kTileRows; ++row) {
            const int64_t r = tile * kTileRows + row;
            if (r >= j.n) break;  // padding rows stay zero
            const uint8_t* src = j.src + r * j.src_row_bytes;
            for (int64_t b = 0; b < kb; ++b) {
                const uint8_t* blk = src + b * block_bytes;
                uint8_t* unit = j.dst + (tile * kb + b) * tb;
                std::memcpy(unit + qbytes + row * 2, blk, 2);  // d
                if (with_min) std::memcpy(unit + qbytes + 32 + row * 2, blk + 2, 2);  // m
                const uint8_t* qs = blk + (q8 ? 2 : with_min ? 4 : 2);
                if (q8) {
                    for (int g = 0; g < 8; ++g)
                        for (int i = 0; i < 4; ++i) unit[g * 64 + row * 4 + i] = qs[4 * g + i] ^ 0x80;
                } else {
                    for (int v = 0; v < 4; ++v) std::memcpy(unit + v * 64 + row * 4, qs + 4 * v, 4);
                }
            }
        }
    }
}

}  // namespace

void repack_ggml(int fmt, const uint8_t* src, int64_t src_row_bytes, int64_t n, int64_t k, uint8_t* dst) {
    RepackJob j{fmt, src, src_row_bytes, n, k, dst};
    parallel_for((n + kTileRows - 1) / kTileRows, repack_tiles, &j);
}

}  // namespace ironlm
