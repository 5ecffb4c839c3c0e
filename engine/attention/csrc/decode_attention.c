/* Decode attention reading the KV cache in place, in either KV layout, and the KV row store.
 *
 * Both layouts are pages of `page_tokens` token rows, `token_stride` elements apart, pages `page_stride`
 * elements apart. Paged (block tables): page p of the sequence in slot s is pages[tables[s, p]], so token t's
 * row starts at tables[s * table_stride + t / P] * page_stride + (t % P) * token_stride. Contiguous
 * (tables == NULL): each slot is one page of max_len tokens, so the row is s * page_stride + t * token_stride.
 * Each sequence's row offsets are worked out once (no division per token) and both passes read through them.
 *
 * One query token per sequence. For sequence b the keys are its tokens t in [start_b, len_b) (start_b > 0
 * only for sliding windows; pages before the window are never read). Each sequence is one task: token by
 * token, its whole K row (every key/value head, contiguous) is scored against the G = H / KVH query heads of
 * each key/value head, the scores are softmaxed, and the values are accumulated the same way, so K and V are
 * each read once, front to back. (A task per (sequence, head) read the same bytes in strided pieces and
 * measured 2x slower at batch 8-64; each dot product is summed in the same order either way, so the results
 * are bit-identical.) The layout only changes where a row is, never the order of any sum, so paged and
 * contiguous results are bit-identical. No gather, no copy. fp32 accumulation; the cache is fp32 or bf16.
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

/* offsets[i] = element offset of token start + i's row, i < count, for the sequence in `slot` */
static void row_offsets(int64_t *offsets, const int64_t *tables, int64_t table_stride, int64_t slot,
                        int64_t page_stride, int64_t page_tokens, int64_t token_stride, int64_t start, int64_t count) {
    const int64_t *table = tables ? tables + slot * table_stride : NULL;
    int64_t page = start / page_tokens, within = start % page_tokens;
    int64_t base = (table ? table[page] : slot) * page_stride;
    for (int64_t t = 0; t < count; ++t) {
        offsets[t] = base + within * token_stride;
        if (++within == page_tokens && t + 1 < count) {
            within = 0;
            base = (table ? table[++page] : slot) * page_stride;
        }
    }
}

/* Per-thread scratch: scores [num_heads, count] and row offsets [count], grown as needed. */
typedef struct {
    int64_t capacity;
    float *scores;
    int64_t *offsets;
} Scratch;

static void reserve(Scratch *scratch, int64_t count, int64_t num_heads) {
    if (count <= scratch->capacity) return;
    scratch->capacity = count * 2;
    free(scratch->scores);
    free(scratch->offsets);
    scratch->scores = (float *)malloc(sizeof(float) * scratch->capacity * num_heads);
    scratch->offsets = (int64_t *)malloc(sizeof(int64_t) * scratch->capacity);
}

#define DECODE_ARGS(KV_T)                                                                                   \
    const float *q, const KV_T *k_cache, const KV_T *v_cache, int64_t page_stride, int64_t token_stride,    \
    int64_t page_tokens, const int64_t *tables, int64_t table_stride, const int64_t *slots,                  \
    const int64_t *lens, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,        \
    int64_t window, float scale, float *out, int64_t num_threads

#define DEFINE_DECODE(NAME, KV_T, LOAD)                                                              \
void NAME(DECODE_ARGS(KV_T)) {                                                                      \
    _Pragma("omp parallel num_threads(num_threads)")                                                \
    {                                                                                               \
        Scratch scratch = {0, NULL, NULL};                                                          \
        float *acc = (float *)malloc(sizeof(float) * num_heads * head_dim);                         \
        _Pragma("omp for schedule(dynamic, 1)")                                                     \
        for (int64_t b = 0; b < num_seqs; ++b) {                                                    \
            const int64_t len = lens[b];                                                            \
            const int64_t start = (window > 0 && len > window) ? len - window : 0;                  \
            const int64_t count = len - start;                                                      \
            reserve(&scratch, count, num_heads);                                                    \
            float *scores = scratch.scores;                                                         \
            const int64_t *offsets = scratch.offsets;                                               \
            row_offsets(scratch.offsets, tables, table_stride, slots[b], page_stride, page_tokens,  \
                        token_stride, start, count);                                                \
            const int64_t group = num_heads / num_kv_heads;                                         \
            const float *query = q + b * num_heads * head_dim;                                      \
            for (int64_t t = 0; t < count; ++t) {                                                   \
                const KV_T *row = k_cache + offsets[t];                                             \
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
                const KV_T *row = v_cache + offsets[t];                                             \
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
        free(scratch.scores);                                                                       \
        free(scratch.offsets);                                                                      \
        free(acc);                                                                                  \
    }                                                                                               \
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_float(x)
DEFINE_DECODE(decode_attention_f32, float, LOAD_F32)

#if defined(__AVX512BF16__) && defined(__AVX512F__)
DEFINE_DECODE(decode_attention_bf16_scalar, uint16_t, LOAD_BF16)
#include "decode_attention_bf16.h"

void decode_attention_bf16(DECODE_ARGS(uint16_t)) {
    const int64_t group = num_heads / num_kv_heads;
    if (head_dim % 64 != 0 || group > MAX_GROUP) {  /* shapes the vector path does not take */
        decode_attention_bf16_scalar(q, k_cache, v_cache, page_stride, token_stride, page_tokens, tables,
                                     table_stride, slots, lens, num_seqs, num_heads, num_kv_heads, head_dim,
                                     window, scale, out, num_threads);
        return;
    }
    _Pragma("omp parallel num_threads(num_threads)")
    {
        Scratch scratch = {0, NULL, NULL};
        __m512bh *q_bf16 = (__m512bh *)aligned_alloc(64, sizeof(__m512bh) * num_heads * (head_dim / 32));
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t b = 0; b < num_seqs; ++b) {
            const int64_t len = lens[b];
            const int64_t start = (window > 0 && len > window) ? len - window : 0;
            const int64_t count = len - start;
            reserve(&scratch, count, num_heads);
            row_offsets(scratch.offsets, tables, table_stride, slots[b], page_stride, page_tokens, token_stride,
                        start, count);
            decode_one_bf16(q + b * num_heads * head_dim, k_cache, v_cache, scratch.offsets, count, num_heads,
                            num_kv_heads, head_dim, scale, scratch.scores, q_bf16, out + b * num_heads * head_dim);
        }
        free(scratch.scores);
        free(scratch.offsets);
        free(q_bf16);
    }
}
#else
DEFINE_DECODE(decode_attention_bf16, uint16_t, LOAD_BF16)
#endif

/* Each step's new keys (or values) written into the cache, one memcpy per token row: row i (`row_bytes`,
 * source rows `source_stride` bytes apart: a view into the fused qkv buffer) goes to token positions[i] of
 * the sequence in slot slots[i], addressed as in the decode kernels (strides in bytes here). Replaces an
 * index_copy_ (or, paged, a two-index index_put) per layer and tensor that cost ~80 us at batch 64 for
 * ~25 KB of data. Checked like torch's indexing before anything is written: returns the first bad row + 1.
 * Contiguous (tables == NULL): slot < num_pages and position < page_tokens. Paged: slot < table_rows,
 * position / page_tokens < table_stride, and the page there must be mapped (index 1..num_pages-1: page 0
 * is the layout's never-mapped null page). */
int64_t store_rows(char *cache, int64_t num_pages, int64_t page_stride, int64_t page_tokens, int64_t token_stride,
                   const int64_t *tables, int64_t table_rows, int64_t table_stride, const int64_t *slots,
                   const int64_t *positions, int64_t num_rows, const char *rows, int64_t source_stride,
                   int64_t row_bytes) {
    for (int64_t i = 0; i < num_rows; ++i) {
        if (positions[i] < 0 || slots[i] < 0) return i + 1;
        if (tables == NULL) {
            if (slots[i] >= num_pages || positions[i] >= page_tokens) return i + 1;
        } else {
            if (slots[i] >= table_rows || positions[i] / page_tokens >= table_stride) return i + 1;
            const int64_t page = tables[slots[i] * table_stride + positions[i] / page_tokens];
            if (page < 1 || page >= num_pages) return i + 1;
        }
    }
    for (int64_t i = 0; i < num_rows; ++i) {
        const int64_t page = tables ? tables[slots[i] * table_stride + positions[i] / page_tokens] : slots[i];
        const int64_t within = tables ? positions[i] % page_tokens : positions[i];
        memcpy(cache + page * page_stride + within * token_stride, rows + i * source_stride, row_bytes);
    }
    return 0;
}
