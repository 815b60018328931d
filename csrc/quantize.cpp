// Dense float32/bfloat16 (N, K) weights quantized straight into packed tiles, one pass, with
// GGML's reference rounding (quantize_row_q8_0/q4_0/q4_1_ref), so blocks match llama.cpp's.
#include "quantize.h"

#include <cmath>
#include <cstring>

#include "kernels.h"
#include "threadpool.h"

namespace ironlm {
namespace {

uint16_t half_bits(float f) {  // float -> IEEE fp16, round to nearest even
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
    if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past the largest half
    if (x < 0x38800000u) {  // subnormal half (or zero)
        if (x < 0x33000000u) return static_cast<uint16_t>(sign);
        const uint32_t mant = (x & 0x7fffffu) | 0x800000u;
        const int shift = 113 - static_cast<int>(x >> 23) + 13;
        uint32_t h = mant >> shift;
        const uint32_t rest = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (h & 1u))) ++h;
        return static_cast<uint16_t>(sign | h);
    }
    uint32_t h = ((x >> 13) - (112u << 10));
    const uint32_t rest = x & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
}

struct QuantJob {
    int fmt;
    const void* src;
    bool src_bf16;
    int64_t ld, n, k;
    uint8_t* dst;
};

void load_block(const QuantJob& j, int64_t r, int64_t c0, float* x) {
    for (int i = 0; i < kBlock; ++i) {
        const int64_t c = c0 + i;
        float v = 0.0f;
        if (c < j.k) {
            if (j.src_bf16) {
                const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(j.src)[r * j.ld + c]) << 16;
                std::memcpy(&v, &u, 4);
            } else {
                v = static_cast<const float*>(j.src)[r * j.ld + c];
            }
        }
        x[i] = v;
    }
}

void quantize_tiles(void* ctx, int64_t begin, int64_t end) {
    const QuantJob& j = *static_cast<const QuantJob*>(ctx);
    const int64_t kb = (j.k + kBlock - 1) / kBlock, tb = tile_block_bytes(j.fmt);
    const bool q8 = j.fmt == static_cast<int>(WeightFormat::int8);
    const int64_t qbytes = q8 ? 8 * 64 : 4 * 64;
    float x[kBlock];
    uint8_t q[kBlock];
    for (int64_t tile = begin; tile < end; ++tile) {
        for (int row = 0; row < kTileRows; ++row) {
            const int64_t r = tile * kTileRows + row;
            if (r >= j.n) break;  // padding rows stay zero
            for (int64_t b = 0; b < kb; ++b) {
                load_block(j, r, b * kBlock, x);
                uint8_t* unit = j.dst + (tile * kb + b) * tb;
                uint16_t d_bits, m_bits = 0;
                if (q8) {
                    float amax = 0.0f;
                    for (int i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(x[i]));
                    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
                    for (int i = 0; i < kBlock; ++i) q[i] = static_cast<uint8_t>(static_cast<int>(std::roundf(x[i] * id)) + 128);
                    d_bits = half_bits(d);
                } else if (j.fmt == static_cast<int>(WeightFormat::int4_sym)) {
                    float amax = 0.0f, vmax = 0.0f;
                    for (int i = 0; i < kBlock; ++i) {
                        if (amax < std::fabs(x[i])) {
                            amax = std::fabs(x[i]);
                            vmax = x[i];
                        }
                    }
                    const float d = vmax / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
                    for (int i = 0; i < kBlock; ++i) {
                        const int v = static_cast<int8_t>(x[i] * id + 8.5f);
                        q[i] = static_cast<uint8_t>(v > 15 ? 15 : v);
                    }
                    d_bits = half_bits(d);
                } else {
                    float vmin = x[0], vmax = x[0];
                    for (int i = 1; i < kBlock; ++i) {
                        vmin = x[i] < vmin ? x[i] : vmin;
                        vmax = x[i] > vmax ? x[i] : vmax;
                    }
                    const float d = (vmax - vmin) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
                    for (int i = 0; i < kBlock; ++i) {
                        const int v = static_cast<int8_t>((x[i] - vmin) * id + 0.5f);
                        q[i] = static_cast<uint8_t>(v > 15 ? 15 : v);
                    }
                    d_bits = half_bits(d);
                    m_bits = half_bits(vmin);
                }
                std::memcpy(unit + qbytes + row * 2, &d_bits, 2);
                if (j.fmt == static_cast<int>(WeightFormat::int4)) std::memcpy(unit + qbytes + 32 + row * 2, &m_bits, 2);
                if (q8) {
                    for (int g = 0; g < 8; ++g) std::memcpy(unit + g * 64 + row * 4, q + 4 * g, 4);
                } else {
                    for (int v = 0; v < 4; ++v)
                        for (int i = 0; i < 4; ++i)
                            unit[v * 64 + row * 4 + i] = static_cast<uint8_t>(q[4 * v + i] | (q[16 + 4 * v + i] << 4));
                }
            }
        }
    }
}

}  // namespace

void quantize_pack(int fmt, const void* src, bool src_bf16, int64_t ld, int64_t n, int64_t k, uint8_t* dst) {
    QuantJob j{fmt, src, src_bf16, ld, n, k, dst};
    parallel_for((n + kTileRows - 1) / kTileRows, quantize_tiles, &j);
}

}  // namespace ironlm
