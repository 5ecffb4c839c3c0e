/* Decode attention over the contiguous KV layout, reading the cache in place.
 *
 * One query token per sequence. For sequence b the keys are k_cache[slot_b, t, :, :] for t in
 * [start_b, len_b) (start_b > 0 only for sliding windows). Each sequence is one task: token by token,
 * its whole K row (every key/value head, contiguous) is scored against the G = H / KVH query heads of
 * each key/value head, the scores are softmaxed, and the values are accumulated the same way, so K and
 * V are each read once, front to back. (A task per (sequence, head) read the same bytes in strided
 * pieces and measured 2x slower at batch 8-64; each dot product is summed in the same order either
 * way, so the results are bit-identical.) No gather, no copy. fp32 accumulation; the cache is fp32 or bf16.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t value) {
    uint32_t bits = ((uint32_t)value) << 16;
    float out;
    memcpy(&out, &bits, sizeof(out));
    return out;
}

#define DEFINE_DECODE(NAME, KV_T, LOAD)                                                              \
void NAME(const float *q, const KV_T *k_cache, const KV_T *v_cache, int64_t slot_stride,           \
          int64_t token_stride, const int64_t *slots, const int64_t *lens, int64_t num_seqs,        \
          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t window, float scale,   \
          float *out, int64_t num_threads) {                                                        \
    _Pragma("omp parallel num_threads(num_threads)")                                                \
    {                                                                                               \
        int64_t capacity = 0;                                                                       \
        float *scores = NULL;                                                                       \
        float *acc = (float *)malloc(sizeof(float) * num_heads * head_dim);                         \
        _Pragma("omp for schedule(dynamic, 1)")                                                     \
        for (int64_t b = 0; b < num_seqs; ++b) {                                                    \
            const int64_t len = lens[b];                                                            \
            const int64_t start = (window > 0 && len > window) ? len - window : 0;                  \
            const int64_t count = len - start;                                                      \
            if (count * num_heads > capacity) {                                                     \
                capacity = count * num_heads * 2;                                                   \
                free(scores);                                                                       \
                scores = (float *)malloc(sizeof(float) * capacity);                                 \
            }                                                                                       \
            const int64_t group = num_heads / num_kv_heads;                                         \
            const KV_T *keys = k_cache + slots[b] * slot_stride;                                    \
            const KV_T *values = v_cache + slots[b] * slot_stride;                                  \
            const float *query = q + b * num_heads * head_dim;                                      \
            for (int64_t t = 0; t < count; ++t) {                                                   \
                const KV_T *row = keys + (start + t) * token_stride;                                \
                for (int64_t h = 0; h < num_kv_heads; ++h) {                                        \
                    const KV_T *key = row + h * head_dim;                                           \
                    for (int64_t g = 0; g < group; ++g) {                                           \
                        const float *qg = query + (h * group + g) * head_dim;                       \
                        float dot = 0.f;                                                            \
                        _Pragma("omp simd reduction(+:dot)")                                        \
                        for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * LOAD(key[d]);         \
                        scores[(h * group + g) * count + t] = dot * scale;                          \
                    }                                                                               \
                }                                                                                   \
            }                                                                                       \
            for (int64_t hg = 0; hg < num_heads; ++hg) {                                            \
                float *row = scores + hg * count;                                                   \
                float peak = -INFINITY;                                                             \
                for (int64_t t = 0; t < count; ++t) peak = row[t] > peak ? row[t] : peak;           \
                float total = 0.f;                                                                  \
                for (int64_t t = 0; t < count; ++t) { row[t] = expf(row[t] - peak); total += row[t]; } \
                const float inverse = 1.f / total;                                                  \
                for (int64_t t = 0; t < count; ++t) row[t] *= inverse;                              \
            }                                                                                       \
            memset(acc, 0, sizeof(float) * num_heads * head_dim);                                   \
            for (int64_t t = 0; t < count; ++t) {                                                   \
                const KV_T *row = values + (start + t) * token_stride;                              \
                for (int64_t h = 0; h < num_kv_heads; ++h) {                                        \
                    const KV_T *value = row + h * head_dim;                                         \
                    for (int64_t g = 0; g < group; ++g) {                                           \
                        const float p = scores[(h * group + g) * count + t];                        \
                        float *ag = acc + (h * group + g) * head_dim;                               \
                        _Pragma("omp simd")                                                         \
                        for (int64_t d = 0; d < head_dim; ++d) ag[d] += p * LOAD(value[d]);         \
                    }                                                                               \
                }                                                                                   \
            }                                                                                       \
            memcpy(out + b * num_heads * head_dim, acc, sizeof(float) * num_heads * head_dim);      \
        }                                                                                           \
        free(scores);                                                                               \
        free(acc);                                                                                  \
    }                                                                                               \
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_float(x)
DEFINE_DECODE(decode_attention_f32, float, LOAD_F32)
DEFINE_DECODE(decode_attention_bf16, uint16_t, LOAD_BF16)
