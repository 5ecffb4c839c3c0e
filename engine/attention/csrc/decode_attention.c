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

#if defined(__AVX512BF16__) && defined(__AVX512F__)
DEFINE_DECODE(decode_attention_bf16_scalar, uint16_t, LOAD_BF16)
#include "../../csrc/simd_exp.h"

#define MAX_GROUP 7   /* group * 4 value accumulators + 4 loaded values fit the 32 vector registers */

/* One sequence of the bf16 cache with AVX512-BF16. q holds bf16 values widened to fp32 (the model's q is
 * bf16), so narrowing it back is exact and vdpbf16ps forms each q.k product exactly, summed in fp32.
 * Scores: per token and key/value head, the head's key is read once (head_dim / 32 vectors) and dotted with
 * the group's queries. Softmax with a vector exp; the 1 / sum is applied once at the end. Values: per
 * key/value head and 64-wide column block, the group's accumulators stay in registers over all tokens. */
static void decode_one_bf16(const float *query, const uint16_t *keys, const uint16_t *values, int64_t start,
                            int64_t count, int64_t token_stride, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, float scale, float *scores, __m512bh *q_bf16, float *out) {
    const int64_t group = num_heads / num_kv_heads, chunks = head_dim / 32;
    for (int64_t hg = 0; hg < num_heads; ++hg)
        for (int64_t c = 0; c < chunks; ++c) {
            const float *source = query + hg * head_dim + c * 32;
            q_bf16[hg * chunks + c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(source + 16), _mm512_loadu_ps(source));
        }
    for (int64_t t = 0; t < count; ++t) {
        const uint16_t *row = keys + (start + t) * token_stride;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
            const uint16_t *key = row + h * head_dim;
            for (int64_t g = 0; g < group; ++g) {
                const int64_t hg = h * group + g;
                __m512 dot = _mm512_setzero_ps();
                for (int64_t c = 0; c < chunks; ++c)
                    dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(key + c * 32), q_bf16[hg * chunks + c]);
                scores[hg * count + t] = _mm512_reduce_add_ps(dot) * scale;
            }
        }
    }
    for (int64_t hg = 0; hg < num_heads; ++hg) {
        float *line = scores + hg * count;
        float peak = -INFINITY;
        for (int64_t t = 0; t < count; ++t) peak = line[t] > peak ? line[t] : peak;
        __m512 sums = _mm512_setzero_ps();
        int64_t t = 0;
        for (; t + 16 <= count; t += 16) {
            const __m512 e = exp512_ps(_mm512_sub_ps(_mm512_loadu_ps(line + t), _mm512_set1_ps(peak)));
            _mm512_storeu_ps(line + t, e);
            sums = _mm512_add_ps(sums, e);
        }
        if (t < count) {
            const __mmask16 tail = (__mmask16)((1u << (count - t)) - 1u);
            const __m512 e = exp512_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, line + t), _mm512_set1_ps(peak)));
            _mm512_mask_storeu_ps(line + t, tail, e);
            sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(tail, e));
        }
        const float inverse = 1.f / _mm512_reduce_add_ps(sums);
        for (int64_t d = 0; d < head_dim; ++d) out[hg * head_dim + d] = inverse;  /* scaled below */
    }
    for (int64_t h = 0; h < num_kv_heads; ++h) {
        for (int64_t block = 0; block < head_dim; block += 64) {
            __m512 acc[MAX_GROUP][4];
            for (int64_t g = 0; g < group; ++g)
                for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_setzero_ps();
            const uint16_t *column = values + start * token_stride + h * head_dim + block;
            for (int64_t t = 0; t < count; ++t, column += token_stride) {
                __m512 v[4];
                for (int i = 0; i < 4; ++i) v[i] = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(column + 16 * i)));
                for (int64_t g = 0; g < group; ++g) {
                    const __m512 p = _mm512_set1_ps(scores[(h * group + g) * count + t]);
                    for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_fmadd_ps(p, v[i], acc[g][i]);
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                float *target = out + (h * group + g) * head_dim + block;
                for (int i = 0; i < 4; ++i)
                    _mm512_storeu_ps(target + 16 * i, _mm512_mul_ps(acc[g][i], _mm512_loadu_ps(target + 16 * i)));
            }
        }
    }
}

void decode_attention_bf16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, int64_t slot_stride,
                           int64_t token_stride, const int64_t *slots, const int64_t *lens, int64_t num_seqs,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t window, float scale,
                           float *out, int64_t num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    if (head_dim % 64 != 0 || group > MAX_GROUP) {  /* shapes the vector path does not take */
        decode_attention_bf16_scalar(q, k_cache, v_cache, slot_stride, token_stride, slots, lens, num_seqs,
                                     num_heads, num_kv_heads, head_dim, window, scale, out, num_threads);
        return;
    }
    _Pragma("omp parallel num_threads(num_threads)")
    {
        int64_t capacity = 0;
        float *scores = NULL;
        __m512bh *q_bf16 = (__m512bh *)aligned_alloc(64, sizeof(__m512bh) * num_heads * (head_dim / 32));
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t b = 0; b < num_seqs; ++b) {
            const int64_t len = lens[b];
            const int64_t start = (window > 0 && len > window) ? len - window : 0;
            const int64_t count = len - start;
            if (count * num_heads > capacity) {
                capacity = count * num_heads * 2;
                free(scores);
                scores = (float *)malloc(sizeof(float) * capacity);
            }
            decode_one_bf16(q + b * num_heads * head_dim, k_cache + slots[b] * slot_stride,
                            v_cache + slots[b] * slot_stride, start, count, token_stride, num_heads, num_kv_heads,
                            head_dim, scale, scores, q_bf16, out + b * num_heads * head_dim);
        }
        free(scores);
        free(q_bf16);
    }
}
#else
DEFINE_DECODE(decode_attention_bf16, uint16_t, LOAD_BF16)
#endif

/* cache[slots[i], positions[i], :] = rows[i, :] for i < num_rows: each step's new keys (or values) written
 * into the contiguous layout, `row_bytes` per token, source rows `source_stride` bytes apart (a view into
 * the fused qkv buffer). Strides are in bytes. Replaces an index_copy_ per layer and tensor that cost
 * ~80 us at batch 64 for ~25 KB of data. */
int64_t store_rows(char *cache, int64_t num_slots, int64_t slot_stride, int64_t max_len, int64_t token_stride,
                   const int64_t *slots, const int64_t *positions, int64_t num_rows, const char *rows,
                   int64_t source_stride, int64_t row_bytes) {
    for (int64_t i = 0; i < num_rows; ++i)  /* checked like torch's indexing: returns the first bad row + 1 */
        if (slots[i] < 0 || slots[i] >= num_slots || positions[i] < 0 || positions[i] >= max_len) return i + 1;
    for (int64_t i = 0; i < num_rows; ++i)
        memcpy(cache + slots[i] * slot_stride + positions[i] * token_stride, rows + i * source_stride, row_bytes);
    return 0;
}
