// Fused small ops and (through attention_impl.h) paged decode attention, written once with GCC vector
// extensions and compiled per ISA level (ops_scalar.cpp, ops_avx2.cpp, ops_avx512.cpp). A vector is as wide as
// the level's registers: 16 floats with AVX-512, 8 with AVX2, 4 with the baseline's SSE2. GCC keeps a generic
// vector wider than the hardware's in memory, not in registers, so a 16-float vector on AVX2 ran several
// times slower than two 8-float ones. Included inside an anonymous namespace.

#if defined(__AVX512F__)
#define IRONLM_LANES 16
#elif defined(__AVX2__)
#define IRONLM_LANES 8
#else
#define IRONLM_LANES 4
#endif
constexpr int kLanes = IRONLM_LANES;
constexpr int kVecBytes = 4 * kLanes;
typedef float vf __attribute__((vector_size(kVecBytes)));
typedef int32_t vi __attribute__((vector_size(kVecBytes)));
typedef uint32_t vu __attribute__((vector_size(kVecBytes)));
typedef uint16_t vh __attribute__((vector_size(kVecBytes / 2)));
typedef int8_t vc __attribute__((vector_size(kVecBytes / 4)));
// Registers of the level's width: what the register tiles below are sized by.
constexpr int kVecRegs = kLanes == 16 ? 32 : 16;

// Not vf{} + v: adding +0 is not an identity (-0 + 0 = +0), so the compiler emits the add before broadcasting.
inline vf splat(float v) {
#if IRONLM_LANES == 16
    return vf{v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
#elif IRONLM_LANES == 8
    return vf{v, v, v, v, v, v, v, v};
#else
    return vf{v, v, v, v};
#endif
}

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

// The lowest 4 lanes of a tree of half-width combinations of v: max or sum.
template <bool kMax>
inline v4f fold4(vf v) {
#if IRONLM_LANES == 16
    v8f lo, hi;
    __builtin_memcpy(&lo, &v, 32);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
    if constexpr (kMax) lo = lo > hi ? lo : hi;
    else lo += hi;
#elif IRONLM_LANES == 8
    const v8f lo = v;
#endif
#if IRONLM_LANES >= 8
    v4f a, b;
    __builtin_memcpy(&a, &lo, 16);
    __builtin_memcpy(&b, reinterpret_cast<const char*>(&lo) + 16, 16);
    if constexpr (kMax) a = a > b ? a : b;
    else a += b;
    return a;
#else
    return v;
#endif
}

inline float hsum(vf v) {  // a tree of half-width adds
    const v4f a = fold4<false>(v);
    return (a[0] + a[2]) + (a[1] + a[3]);
}

inline float hmax(vf v) {  // a tree of half-width maxima, like hsum
    const v4f a = fold4<true>(v);
    const float x = a[0] > a[2] ? a[0] : a[2], y = a[1] > a[3] ? a[1] : a[3];
    return x > y ? x : y;
}

inline vf lane_index() {  // {0, 1, 2, ...}
    vf lane;
    for (int i = 0; i < kLanes; ++i) lane[i] = static_cast<float>(i);
    return lane;
}

// Loads and stores of one vector (n < kLanes for a row's tail: the rest reads as 0).
inline vf vload(const float* p, int n = kLanes) {
    vf v = {};
    if (n == kLanes) __builtin_memcpy(&v, p, kVecBytes);
    else __builtin_memcpy(&v, p, n * 4);
    return v;
}

inline vf vload(const uint16_t* p, int n = kLanes) {
    vh h = {};
    if (n == kLanes) __builtin_memcpy(&h, p, kVecBytes / 2);
    else __builtin_memcpy(&h, p, n * 2);
    const vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    __builtin_memcpy(&f, &u, kVecBytes);
    return f;
}

inline void vstore(float* p, vf v, int n = kLanes) {
    if (n == kLanes) __builtin_memcpy(p, &v, kVecBytes);  // constant size: one vector store, no call
    else __builtin_memcpy(p, &v, n * 4);
}

inline void vstore(uint16_t* p, vf v, int n = kLanes) {
    vu u;
    __builtin_memcpy(&u, &v, kVecBytes);
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (NaN payloads are not preserved)
    const vh h = __builtin_convertvector(u >> 16, vh);
    if (n == kLanes) __builtin_memcpy(p, &h, kVecBytes / 2);
    else __builtin_memcpy(p, &h, n * 2);
}

inline vf round_bf16(vf v) {  // what storing as bf16 and loading back gives
    alignas(64) uint16_t t[kLanes];
    vstore(t, v);
    return vload(t);
}

inline vf load_any(const void* p, DType t, int64_t i, int n = kLanes) {
    return t == DType::f32 ? vload(static_cast<const float*>(p) + i, n) : vload(static_cast<const uint16_t*>(p) + i, n);
}

inline void store_any(void* p, DType t, int64_t i, vf v, int n = kLanes) {
    if (t == DType::f32) vstore(static_cast<float*>(p) + i, v, n);
    else vstore(static_cast<uint16_t*>(p) + i, v, n);
}

inline const void* row_ptr(const void* p, DType t, int64_t offset) {
    return static_cast<const char*>(p) + offset * (t == DType::f32 ? 4 : 2);
}

inline void* row_ptr(void* p, DType t, int64_t offset) {
    return static_cast<char*>(p) + offset * (t == DType::f32 ? 4 : 2);
}

constexpr float kLog2e = 1.44269504088896341f;  // what turns e^x into 2^(x log2 e)

// exp for float vectors: 2^n * p(r), |r| <= ln2/2, relative error about 2e-7 (Cephes polynomial).
inline vf vexp(vf x) {
    x = x > 88.0f ? splat(88.0f) : x;
    x = x < -88.0f ? splat(-88.0f) : x;
    const vf fx = x * kLog2e;
    vi n = __builtin_convertvector(fx + (fx >= 0.0f ? splat(0.5f) : splat(-0.5f)), vi);
    const vf nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vi bits = (n + 127) << 23;
    vf scale;
    __builtin_memcpy(&scale, &bits, kVecBytes);
    return p * scale;
}

// 2^x for a softmax's weights, x at most 127 (scores less a reference max, in log2 units): the round
// to an integer n is an add of 1.5 * 2^23, whose low mantissa bits are then n, and n <= -127 gives 2^n = 0
// exactly (so do -inf and masked scores). Fewer steps than vexp: no clamp above, no conversions; a
// degree-5 fit of 2^f on [-0.5, 0.5], within a few float ulps. NaN stays NaN.
inline vf vexp2_weight(vf x) {
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
    x = x < -127.0f ? splat(-127.0f) : x;
    const vf t = x + kRound;
    const vf f = x - (t - kRound);
    vf p = splat(1.3276205e-3f);
    p = p * f + 9.6755084e-3f;
    p = p * f + 5.5507138e-2f;
    p = p * f + 2.4022121e-1f;
    p = p * f + 6.9314694e-1f;
    p = p * f + 1.0000001f;
    vi bits;
    __builtin_memcpy(&bits, &t, kVecBytes);
    bits = (bits + 127) << 23;  // t's bits are 0x4b400000 + n; the shift drops the 0x4b4 and leaves 2^n
    vf scale;
    __builtin_memcpy(&scale, &bits, kVecBytes);
    return p * scale;
}

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Below this many elements an op runs on the calling thread: handing work to the pool costs a few
// microseconds, about what 32K elements of a norm or rope take on one core (half as many for SiLU, an exp each).
constexpr int64_t kParallelElements = 32768;

// ---- RMSNorm, optionally after residual += x. Matches HF: normalise in float32, cast to the
// input dtype, then multiply by the weight.
void rms_norm_rows(void* ctx, int64_t begin, int64_t end) {
    const NormArgs& a = *static_cast<const NormArgs*>(ctx);
    const int64_t d = a.dim;
    for (int64_t r = begin; r < end; ++r) {
        const void* x = row_ptr(a.x, a.x_type, r / a.x_group * a.ldx_group + r % a.x_group * a.ldx);
        void* res = a.residual ? row_ptr(a.residual, a.r_type, r * a.ldr) : nullptr;
        const void* src = res ? static_cast<const void*>(res) : x;
        const DType src_type = res ? a.r_type : a.x_type;
        vf ss = {};
        for (int64_t i = 0; i < d; i += kLanes) {
            const int n = d - i < kLanes ? static_cast<int>(d - i) : kLanes;
            vf v = load_any(x, a.x_type, i, n);
            if (res) {
                v += load_any(res, a.r_type, i, n);
                store_any(res, a.r_type, i, v, n);
                if (a.r_type == DType::bf16) v = round_bf16(v);
            }
            ss += v * v;
        }
        const float inv = 1.0f / __builtin_sqrtf(hsum(ss) / static_cast<float>(d) + a.eps);
        void* out = row_ptr(a.out, a.o_type, r * a.ldo);
        for (int64_t i = 0; i < d; i += kLanes) {
            const int n = d - i < kLanes ? static_cast<int>(d - i) : kLanes;
            vf v = load_any(src, src_type, i, n) * inv;
            if (src_type == DType::bf16) v = round_bf16(v);
            store_any(out, a.o_type, i, v * load_any(a.weight, a.w_type, i, n), n);
        }
    }
}

void rms_norm(const NormArgs& a) {
    NormArgs copy = a;
    if (a.rows * a.dim >= kParallelElements) parallel_for(a.rows, rms_norm_rows, &copy);
    else rms_norm_rows(&copy, 0, a.rows);
}

// ---- out = silu(gate) * up, gate_up = [gate | up] per row.
void silu_mul_rows(void* ctx, int64_t begin, int64_t end) {
    const SiluMulArgs& a = *static_cast<const SiluMulArgs*>(ctx);
    for (int64_t r = begin; r < end; ++r) {
        const void* g = row_ptr(a.gate_up, a.g_type, r * a.ldg);
        void* out = row_ptr(a.out, a.o_type, r * a.ldo);
        for (int64_t i = 0; i < a.inter; i += kLanes) {
            const int n = a.inter - i < kLanes ? static_cast<int>(a.inter - i) : kLanes;
            const vf gate = load_any(g, a.g_type, i, n), up = load_any(g, a.g_type, a.inter + i, n);
            store_any(out, a.o_type, i, gate / (1.0f + vexp(-gate)) * up, n);
        }
    }
}

void silu_mul(const SiluMulArgs& a) {
    SiluMulArgs copy = a;
    if (a.rows * a.inter >= kParallelElements / 2) parallel_for(a.rows, silu_mul_rows, &copy);  // an exp each
    else silu_mul_rows(&copy, 0, a.rows);
}

// ---- Rotary embedding, neox style (rotate_half), in place on q and k.
void rope_head(void* p, DType t, const float* c, const float* s, int64_t half) {
    for (int64_t i = 0; i < half; i += kLanes) {
        const int n = half - i < kLanes ? static_cast<int>(half - i) : kLanes;
        const vf x1 = load_any(p, t, i, n), x2 = load_any(p, t, half + i, n);
        const vf cv = vload(c + i, n), sv = vload(s + i, n);
        store_any(p, t, i, x1 * cv - x2 * sv, n);
        store_any(p, t, half + i, x2 * cv + x1 * sv, n);
    }
}

void rope_tokens(void* ctx, int64_t begin, int64_t end) {
    const RopeArgs& a = *static_cast<const RopeArgs*>(ctx);
    const int64_t half = a.rot_dim / 2;
    for (int64_t tok = begin; tok < end; ++tok) {
        const float* c = a.cos + a.positions[tok] * half;
        const float* s = a.sin + a.positions[tok] * half;
        for (int64_t h = 0; h < a.q_heads; ++h)
            rope_head(row_ptr(a.q, a.q_type, tok * a.q_token_stride + h * a.q_head_stride), a.q_type, c, s, half);
        for (int64_t h = 0; h < a.k_heads; ++h)
            rope_head(row_ptr(a.k, a.k_type, tok * a.k_token_stride + h * a.k_head_stride), a.k_type, c, s, half);
    }
}

void rope(const RopeArgs& a) {
    RopeArgs copy = a;
    if (a.tokens * (a.q_heads + a.k_heads) * a.rot_dim >= kParallelElements) parallel_for(a.tokens, rope_tokens, &copy);
    else rope_tokens(&copy, 0, a.tokens);
}

#include "attention_impl.h"          // decode attention
#include "kv_write_impl.h"           // new tokens' K and V into the cache
#include "prefill_attention_impl.h"  // causal attention of prompt chunks
#include "sample_impl.h"             // the sampler's penalty, filters and draw

const OpsTable kTable = {rms_norm, silu_mul, rope, attention, kv_write, prefill_attention, sample, repetition_penalty};
