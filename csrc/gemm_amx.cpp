// The AMX level, kept small: bf16 weights for many rows (prefill) through TDPBF16PS tiles.
// Everything else at this level runs the AVX512-BF16/VNNI kernels (gemm.cpp). The packed bf16
// layout is already the B-tile layout: 16 column pairs x 16 output rows x 2 bf16 = one 1 KiB tile.
//
// Not runnable on the development machine (no AMX); tests cover it only on AMX hardware.
#include "kernels.h"
#include "threadpool.h"

#include <immintrin.h>

namespace ironlm {
namespace {

constexpr int kRowsPerTile = 16;
constexpr int kRowGroup = 2 * kRowsPerTile;  // two A tiles per pass

struct alignas(64) TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Tiles 0-3: C accumulators (2 row tiles x 2 column tiles) of 16 x 16 float;
// 4-5: A, 16 rows x 32 bf16 of activations; 6-7: B, 16 column pairs x 16 outputs.
// Tile state is per thread, so every thread configures before use and releases after.
void configure_tiles() {
    TileConfig cfg{};
    cfg.palette_id = 1;
    for (int i = 0; i < 8; ++i) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}

uint16_t to_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

struct AmxJob {
    const GemmArgs* a;
    int64_t num_tiles, rows_padded;
    uint16_t* xb;  // (rows_padded, k_padded) bf16, zero beyond (m, k)
};

void prepare(void* ctx, int64_t begin, int64_t end) {
    const AmxJob& j = *static_cast<const AmxJob*>(ctx);
    const GemmArgs& a = *j.a;
    for (int64_t r = begin; r < end; ++r) {
        uint16_t* dst = j.xb + r * a.k_padded;
        for (int64_t c = 0; c < a.k_padded; ++c) {
            uint16_t v = 0;
            if (r < a.m && c < a.k) {
                v = a.x_bf16 ? static_cast<const uint16_t*>(a.x)[r * a.ldx + c]
                             : to_bf16(static_cast<const float*>(a.x)[r * a.ldx + c]);
            }
            dst[c] = v;
        }
    }
}

void store(const GemmArgs& a, const float* c, int64_t r0, int64_t tile) {
    const int64_t c0 = tile * kTileRows;
    for (int64_t i = 0; i < kRowsPerTile && r0 + i < a.m; ++i) {
        for (int64_t j = 0; j < kTileRows && c0 + j < a.n; ++j) {
            const float v = c[i * kTileRows + j] + (a.bias ? a.bias[c0 + j] : 0.0f);
            if (a.y_bf16) static_cast<uint16_t*>(a.y)[(r0 + i) * a.ldy + c0 + j] = to_bf16(v);
            else static_cast<float*>(a.y)[(r0 + i) * a.ldy + c0 + j] = v;
        }
    }
}

// One unit = a pair of 16-output tiles (or the last single tile) over all rows.
void units(void* ctx, int64_t begin, int64_t end) {
    const AmxJob& j = *static_cast<const AmxJob*>(ctx);
    const GemmArgs& a = *j.a;
    const int64_t kp = a.k_padded, x_stride = kp * 2, tile_bytes = (kp / 2) * 64;
    alignas(64) float c[4][kRowsPerTile * kTileRows];
    configure_tiles();
    for (int64_t u = begin; u < end; ++u) {
        const int64_t t0 = 2 * u;
        const bool two = t0 + 1 < j.num_tiles;
        const uint8_t* b0 = a.w + t0 * tile_bytes;
        const uint8_t* b1 = two ? b0 + tile_bytes : b0;  // a lone last tile computes it twice
        for (int64_t r0 = 0; r0 < j.rows_padded; r0 += kRowGroup) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            const uint16_t* x0 = j.xb + r0 * kp;
            const uint16_t* x1 = x0 + kRowsPerTile * kp;
            for (int64_t k0 = 0; k0 < kp; k0 += 32) {
                _tile_loadd(4, x0 + k0, x_stride);
                _tile_loadd(5, x1 + k0, x_stride);
                _tile_loadd(6, b0 + (k0 / 2) * 64, 64);
                _tile_loadd(7, b1 + (k0 / 2) * 64, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            store(a, c[0], r0, t0);
            store(a, c[2], r0 + kRowsPerTile, t0);
            if (two) {
                store(a, c[1], r0, t0 + 1);
                store(a, c[3], r0 + kRowsPerTile, t0 + 1);
            }
        }
    }
    _tile_release();
}

}  // namespace

void gemm_amx_bf16(const GemmArgs& a) {
    AmxJob j{};
    j.a = &a;
    j.num_tiles = (a.n + kTileRows - 1) / kTileRows;
    j.rows_padded = (a.m + kRowGroup - 1) / kRowGroup * kRowGroup;
    j.xb = static_cast<uint16_t*>(scratch_alloc(j.rows_padded * a.k_padded * 2));
    parallel_for(j.rows_padded, prepare, &j);
    parallel_for((j.num_tiles + 1) / 2, units, &j);
    scratch_free(j.xb);
}

}  // namespace ironlm
