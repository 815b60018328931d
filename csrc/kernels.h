// Weight formats, their packed tile layout, and the per-ISA kernel entry points.
//
// Packed layout (made once at load by ironlm/quant/pack.py): rows are grouped in tiles of 16,
// N padded with zero rows to a multiple of 16, K padded with zeros to a multiple of 32.
// Integer formats, per tile, per block of 32 columns (tile-major, then block):
//   int8     (Q8_0): 8 x 64 bytes  qs[g][row][4] = q[row][4g..4g+3] ^ 0x80 (stored unsigned), d fp16[16]
//   int4_sym (Q4_0): 4 x 64 bytes  qs[v][row][i] = q[row][4v+i] | q[row][16+4v+i] << 4 (the GGML byte), d fp16[16]
//   int4     (Q4_1): as int4_sym, then d fp16[16], m fp16[16]
// Lane `row` of a 64-byte vector holds 4 consecutive columns of one output row, the operand
// shape of vpdpbusd. Value = d * (q - offset) (+ m): offset 128 for int8, 8 for int4_sym, 0 for int4.
// bf16: per tile, per column pair p: [row][2] bf16 (64 bytes), the operand shape of vdpbf16ps.
#pragma once
#include <cstdint>

namespace ironlm {

enum class WeightFormat : int { int8 = 0, int4 = 1, int4_sym = 2, bf16 = 3 };
constexpr int kTileRows = 16;
constexpr int kBlock = 32;

struct GemmArgs {
    int fmt;                 // WeightFormat
    const uint8_t* w;        // packed tiles
    int64_t n;               // output features (unpadded)
    int64_t k_padded;        // multiple of 32
    int64_t m;               // rows of x
    int64_t k;               // columns of x (<= k_padded)
    const void* x;           // (m, k) float32 or bfloat16, row stride ldx elements
    int64_t ldx;
    bool x_bf16;
    void* y;                 // (m, n) float32 or bfloat16, row stride ldy elements
    int64_t ldy;
    bool y_bf16;
    const float* bias;       // (n) or nullptr
};

// Bytes of one (tile, block) unit of an integer format.
inline int64_t tile_block_bytes(int fmt) {
    switch (static_cast<WeightFormat>(fmt)) {
        case WeightFormat::int8: return 8 * 64 + 32;
        case WeightFormat::int4_sym: return 4 * 64 + 32;
        case WeightFormat::int4: return 4 * 64 + 64;
        case WeightFormat::bf16: return 16 * 64;  // 16 column pairs per block of 32
    }
    return 0;
}

using GemmFn = void (*)(const GemmArgs&);
void gemm_scalar(const GemmArgs& a);
void gemm_avx2(const GemmArgs& a);
void gemm_avx_vnni(const GemmArgs& a);       // needs AVX-VNNI
void gemm_avx_vnni_evex(const GemmArgs& a);  // the same code in EVEX form: needs AVX512-VNNI + VL
void gemm_avx512(const GemmArgs& a);
void gemm_avx512_vnni(const GemmArgs& a);
void gemm_avx512_bf16(const GemmArgs& a);
// bf16 weights only, for many rows; needs AMX-BF16 and the OS permission (dispatch.cpp).
void gemm_amx_bf16(const GemmArgs& a);

}  // namespace ironlm
