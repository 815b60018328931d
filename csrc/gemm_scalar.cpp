// The scalar kernel level: plain C++ over the packed layout, for CPUs without AVX2 and as a
// readable statement of what the SIMD levels compute. Single-threaded.
#include "kernels.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace ironlm {
namespace {

float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                --exp;
            }
            u = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

float bf16_to_float(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

uint16_t float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

uint16_t load_u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

// Weight q (as stored) of tile-row `row`, column `c` within block, and its offset.
int32_t int_weight(int fmt, const uint8_t* blk, int row, int c) {
    if (fmt == static_cast<int>(WeightFormat::int8)) {
        return static_cast<int32_t>(blk[(c / 4) * 64 + row * 4 + c % 4]) - 128;
    }
    const int v = (c % 16) / 4, i = c % 4;
    const uint8_t byte = blk[v * 64 + row * 4 + i];
    const int32_t q = c < 16 ? (byte & 0x0f) : (byte >> 4);
    return fmt == static_cast<int>(WeightFormat::int4_sym) ? q - 8 : q;
}

}  // namespace

void gemm_scalar(const GemmArgs& a) {
    const int64_t kp = a.k_padded, kb = kp / kBlock;
    const int64_t num_tiles = (a.n + kTileRows - 1) / kTileRows;
    std::vector<float> x(kp);
    std::vector<int8_t> xq(kp);
    std::vector<float> xs(kb);
    std::vector<int32_t> xsum(kb);
    const bool is_bf16 = a.fmt == static_cast<int>(WeightFormat::bf16);
    const int64_t tb = tile_block_bytes(a.fmt);
    const int64_t qbytes = a.fmt == static_cast<int>(WeightFormat::int8) ? 8 * 64 : 4 * 64;
    for (int64_t r = 0; r < a.m; ++r) {
        for (int64_t c = 0; c < kp; ++c) {
            float v = 0.0f;
            if (c < a.k) {
                v = a.x_bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.x)[r * a.ldx + c])
                             : static_cast<const float*>(a.x)[r * a.ldx + c];
            }
            x[c] = v;
        }
        if (!is_bf16) {  // int8 activations per block of 32, as the SIMD levels do
            for (int64_t b = 0; b < kb; ++b) {
                float amax = 0.0f;
                for (int i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(x[b * kBlock + i]));
                const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
                int32_t sum = 0;
                for (int i = 0; i < kBlock; ++i) {
                    const int32_t q = static_cast<int32_t>(std::nearbyint(x[b * kBlock + i] * id));
                    xq[b * kBlock + i] = static_cast<int8_t>(q);
                    sum += q;
                }
                xs[b] = amax / 127.0f;
                xsum[b] = sum;
            }
        }
        for (int64_t tile = 0; tile < num_tiles; ++tile) {
            for (int row = 0; row < kTileRows; ++row) {
                const int64_t col = tile * kTileRows + row;
                if (col >= a.n) break;
                float acc = 0.0f;
                if (is_bf16) {
                    const uint8_t* wt = a.w + tile * (kp / 2) * 64;
                    for (int64_t c = 0; c < kp; ++c) {
                        const uint16_t w = load_u16(wt + (c / 2) * 64 + row * 4 + (c % 2) * 2);
                        acc += bf16_to_float(w) * x[c];
                    }
                } else {
                    for (int64_t b = 0; b < kb; ++b) {
                        const uint8_t* blk = a.w + (tile * kb + b) * tb;
                        int32_t dot = 0;
                        for (int c = 0; c < kBlock; ++c) dot += int_weight(a.fmt, blk, row, c) * xq[b * kBlock + c];
                        const float d = half_to_float(load_u16(blk + qbytes + row * 2));
                        acc += d * xs[b] * static_cast<float>(dot);
                        if (a.fmt == static_cast<int>(WeightFormat::int4)) {
                            const float mn = half_to_float(load_u16(blk + qbytes + 32 + row * 2));
                            acc += mn * xs[b] * static_cast<float>(xsum[b]);
                        }
                    }
                }
                if (a.bias) acc += a.bias[col];
                if (a.y_bf16) static_cast<uint16_t*>(a.y)[r * a.ldy + col] = float_to_bf16(acc);
                else static_cast<float*>(a.y)[r * a.ldy + col] = acc;
            }
        }
    }
}

}  // namespace ironlm
