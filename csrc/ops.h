// Fused small ops and decode attention: entry points on the current ISA level.
#pragma once
#include <cstdint>

namespace ironlm {

// A tensor element type the ops accept; i8 only for KV caches, each row with a float scale.
enum class DType : int { f32 = 0, bf16 = 1, i8 = 2 };

struct NormArgs {
    int64_t rows, dim;
    // (rows, dim) in groups of x_group rows: row r at (r / x_group) * ldx_group + (r % x_group) * ldx, so a
    // (T, H, D) view of a fused qkv output is normed per head without a copy (one group: a plain matrix)
    const void* x; int64_t ldx; int64_t x_group, ldx_group; DType x_type;
    void* residual; int64_t ldr; DType r_type;   // (rows, dim) or nullptr; updated to residual + x
    const void* weight; DType w_type;            // (dim)
    void* out; int64_t ldo; DType o_type;        // (rows, dim)
    float eps;
};

struct SiluMulArgs {
    int64_t rows, inter;                         // gate_up is (rows, 2 * inter)
    const void* gate_up; int64_t ldg; DType g_type;
    void* out; int64_t ldo; DType o_type;        // (rows, inter)
};

struct RopeArgs {
    int64_t tokens, dim, rot_dim;                // rotate the first rot_dim of dim (neox halves)
    void* q; int64_t q_heads, q_token_stride, q_head_stride; DType q_type;
    void* k; int64_t k_heads, k_token_stride, k_head_stride; DType k_type;
    const int64_t* positions;                    // (tokens)
    const float* cos; const float* sin;          // (max_positions, rot_dim / 2)
};

struct AttentionArgs {
    int64_t batch, heads, kv_heads, head_dim, block_size, max_blocks;
    const void* q; DType q_type; int64_t q_stride_b, q_stride_h;   // (B, H, D)
    const void* k_cache; const void* v_cache; DType kv_type;      // (blocks, KVH, block_size, D), contiguous
    const float* k_scale; const float* v_scale;                   // i8 caches: (blocks, KVH, block_size), else null
    const int32_t* block_tables;                                  // (B, max_blocks)
    const int32_t* context_lens;                                  // (B)
    float scale;
    void* out; DType o_type;                                      // (B, H, D) contiguous
};

struct KvWriteArgs {
    int64_t tokens, kv_heads, head_dim, block_size;
    const void* k; int64_t k_stride_t, k_stride_h; DType k_type;   // (T, KVH, D), D contiguous
    const void* v; int64_t v_stride_t, v_stride_h; DType v_type;
    void* k_cache; void* v_cache; DType kv_type;                   // (blocks, KVH, block_size, D), contiguous
    float* k_scale; float* v_scale;                                // i8 caches: (blocks, KVH, block_size), else null
    const int64_t* slots;                                          // (T) block * block_size + offset
};

struct PrefillAttentionArgs {
    int64_t q_len, context, heads, kv_heads, head_dim;  // query row i sits at position context - q_len + i
    const void* q; int64_t q_stride_t, q_stride_h; DType q_type;  // (L, H, D), D contiguous
    const void* k; int64_t k_stride_t, k_stride_h; DType k_type;  // (C, KVH, D), D contiguous
    const void* v; int64_t v_stride_t, v_stride_h; DType v_type;
    float scale;
    void* out; DType o_type;                                      // (L, H, D) contiguous
    // Paged K/V instead, when block_table is set: k and v are a cache's pools (blocks, KVH, block_size, D),
    // contiguous, key t sits in block block_table[t / block_size], and i8 pools bring row scales
    // (blocks, KVH, block_size). The strides above are then unused.
    const int32_t* block_table; int64_t block_size;
    const float* k_scale; const float* v_scale;
};

struct SampleArgs {
    int64_t rows, vocab;                          // vocab at most kMaxSampleVocab
    float* logits; int64_t ld;                    // (rows, vocab) float32, overwritten with weights
    const float* temperature;                     // (rows) > 0
    const int64_t* top_k;                         // (rows) 0: none
    const float* top_p; const float* min_p;       // (rows) top_p in (0, 1], min_p in [0, 1]
    const double* u;                              // (rows) uniform in [0, 1): where each row's draw lands
    int64_t* out;                                 // (rows) the sampled token ids
};
constexpr int64_t kMaxSampleVocab = int64_t{1} << 20;

struct PenaltyArgs {
    int64_t count, vocab;                         // rows penalised
    float* logits; int64_t ld;                    // (rows of the batch, vocab) float32, updated in place
    const int64_t* rows;                          // (count) which rows of logits
    const int64_t* offsets;                       // (count + 1): row i's token ids are ids[offsets[i], offsets[i + 1])
    const int64_t* ids;                           // distinct within a row, each in [0, vocab)
    const float* penalty;                         // (count) > 0
};

struct OpsTable {
    void (*rms_norm)(const NormArgs&);
    void (*silu_mul)(const SiluMulArgs&);
    void (*rope)(const RopeArgs&);
    void (*attention)(const AttentionArgs&);
    void (*kv_write)(const KvWriteArgs&);
    void (*prefill_attention)(const PrefillAttentionArgs&);
    void (*sample)(const SampleArgs&);
    void (*repetition_penalty)(const PenaltyArgs&);
};

const OpsTable& ops_scalar();
const OpsTable& ops_avx2();
const OpsTable& ops_avx512();
const OpsTable& ops_avx512_bf16();
// The table of the current ISA level.
const OpsTable& ops();

}  // namespace ironlm
