/* Prefill attention over an fp32 KV cache on AVX2/FMA CPUs: every prompt chunk of a step in one call (the fp32
 * twin of prefill_attention.c, same arguments, same tasks, same addressing of either KV layout).
 *
 * Why a kernel: torch's scaled_dot_product_attention on CPU ran SmolLM2's 128-token chunks (9 query and 3
 * key/value heads of 64) in fp32 at ~28 GFLOP/s, one call per chunk and layer: ~10% of a 128-token prefill step
 * on a 2-core AVX2 box (docs/SPEED.md).
 *
 * One task = (chunk, key/value head, block of QUERY_BLOCK query tokens; prefill_tasks.h); its rows are the
 * block's tokens x the group's query heads, which share the head's keys. Flash-style over blocks of KEY_BLOCK keys:
 *   1. the block's keys are copied with the keys in the lanes ([dim][KEY_BLOCK]); values are read in place;
 *   2. scores s = q . k * scale in tiles of 4 rows x 16 keys (8 accumulators; per dim two key loads and four
 *      broadcasts), keys after the row's position, past its window or after the block -inf;
 *   3. online softmax per row (running max m and sum l; the row's output rescaled when m grows);
 *   4. o += p . v in tiles of 3 rows x 32 dims (12 accumulators; per key four value loads, three broadcasts);
 *      at the end out = o / l.
 * All in fp32: the result equals SDPA's up to the order of the sums and exp's last ulp or two (tests/engine/
 * attention/test_prefill_attention.py); the engine's exactness tests hold greedy tokens to transformers'. */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <omp.h>

#include "../../csrc/simd_exp.h"
#include "prefill_tasks.h"

#define QUERY_BLOCK PREFILL_QUERY_BLOCK
#define KEY_BLOCK 64
#define MAX_GROUP 8
#define MAX_HEAD_DIM 256
#define MAX_ROWS (QUERY_BLOCK * MAX_GROUP)

typedef struct {
    float *keys;          /* [head_dim][KEY_BLOCK] */
    const float **values; /* [KEY_BLOCK]: each key's value row */
    float *scores;        /* [rows][KEY_BLOCK], then the probabilities */
    float *acc;           /* [rows][head_dim] */
    float *peak, *sum, *scale_by;  /* [rows] */
} Scratch;

static int scratch_init(Scratch *s, int64_t head_dim) {
    s->keys = (float *)aligned_alloc(32, sizeof(float) * MAX_HEAD_DIM * KEY_BLOCK);
    s->values = (const float **)malloc(sizeof(float *) * KEY_BLOCK);
    s->scores = (float *)aligned_alloc(32, sizeof(float) * MAX_ROWS * KEY_BLOCK);
    s->acc = (float *)aligned_alloc(32, sizeof(float) * MAX_ROWS * (head_dim > 0 ? head_dim : 1));
    s->peak = (float *)malloc(sizeof(float) * MAX_ROWS);
    s->sum = (float *)malloc(sizeof(float) * MAX_ROWS);
    s->scale_by = (float *)malloc(sizeof(float) * MAX_ROWS);
    return s->keys && s->values && s->scores && s->acc && s->peak && s->sum && s->scale_by;
}

static void scratch_free(Scratch *s) {
    free(s->keys), free((void *)s->values), free(s->scores), free(s->acc), free(s->peak), free(s->sum);
    free(s->scale_by);
}

/* the 8 lanes' maximum */
static inline float max_lanes(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* scores[row][8 keys from key0 + 8 v] with the keys a row may not see set to -inf: after its position (or
 * after `last`, the block's last key), or `window` keys or more before it */
static inline void store_masked(float *scores, __m256 dot, float scale, int64_t key0, int64_t position,
                                int64_t last, int64_t window) {
    const __m256 keys = _mm256_add_ps(_mm256_set1_ps((float)key0), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
    const float bound = (float)(position < last ? position : last);
    __m256 ok = _mm256_cmp_ps(keys, _mm256_set1_ps(bound), _CMP_LE_OQ);
    if (window > 0) ok = _mm256_and_ps(ok, _mm256_cmp_ps(keys, _mm256_set1_ps((float)(position - window)), _CMP_GT_OQ));
    const __m256 scaled = _mm256_mul_ps(dot, _mm256_set1_ps(scale));
    _mm256_storeu_ps(scores, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), scaled, ok));
}

/* scores of NR rows from r0 against the 16 keys of group g16 (NR <= 4, a constant at every call) */
static inline __attribute__((always_inline)) void score_rows(const float *const *query, const float *keys,
                                                             float *scores, const int64_t *positions, int64_t r0,
                                                             int64_t g16, int64_t k0, int64_t last, int64_t window,
                                                             int64_t head_dim, float scale, const int NR) {
    __m256 a[4][2];
    for (int r = 0; r < NR; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    const float *column = keys + 16 * g16;
    for (int64_t d = 0; d < head_dim; ++d) {
        const __m256 k0v = _mm256_load_ps(column + d * KEY_BLOCK), k1v = _mm256_load_ps(column + d * KEY_BLOCK + 8);
        for (int r = 0; r < NR; ++r) {
            const __m256 b = _mm256_broadcast_ss(query[r0 + r] + d);
            a[r][0] = _mm256_fmadd_ps(b, k0v, a[r][0]);
            a[r][1] = _mm256_fmadd_ps(b, k1v, a[r][1]);
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < 2; ++v)
            store_masked(scores + (r0 + r) * KEY_BLOCK + 16 * g16 + 8 * v, a[r][v], scale, k0 + 16 * g16 + 8 * v,
                         positions[r0 + r], last, window);
}

/* acc[r][d0..d0+32) = acc * scale_by[r] + sum_j p[r][j] v_j[d0..] for NR rows from r0 (NR <= 3, a constant) */
static inline __attribute__((always_inline)) void value_rows(const float *probs, const float *const *values,
                                                             const float *scale_by, float *acc, int64_t head_dim,
                                                             int64_t r0, int64_t d0, int64_t count, const int NR) {
    __m256 a[3][4];
    for (int r = 0; r < NR; ++r) {
        const __m256 s = _mm256_set1_ps(scale_by[r0 + r]);
        for (int v = 0; v < 4; ++v) a[r][v] = _mm256_mul_ps(_mm256_load_ps(acc + (r0 + r) * head_dim + d0 + 8 * v), s);
    }
    for (int64_t j = 0; j < count; ++j) {
        const float *row = values[j] + d0;
        const __m256 v0 = _mm256_loadu_ps(row), v1 = _mm256_loadu_ps(row + 8);
        const __m256 v2 = _mm256_loadu_ps(row + 16), v3 = _mm256_loadu_ps(row + 24);
        for (int r = 0; r < NR; ++r) {
            const __m256 p = _mm256_broadcast_ss(probs + (r0 + r) * KEY_BLOCK + j);
            a[r][0] = _mm256_fmadd_ps(p, v0, a[r][0]);
            a[r][1] = _mm256_fmadd_ps(p, v1, a[r][1]);
            a[r][2] = _mm256_fmadd_ps(p, v2, a[r][2]);
            a[r][3] = _mm256_fmadd_ps(p, v3, a[r][3]);
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < 4; ++v) _mm256_store_ps(acc + (r0 + r) * head_dim + d0 + 8 * v, a[r][v]);
}

/* row's probabilities p = exp(s - m_new) in place over its first `width` scores (0 where s is -inf); updates
 * its running max and sum and sets scale_by (exp(m_old - m_new), the factor its output so far takes) */
static inline void softmax_row(float *scores, int64_t width, float *peak, float *sum, float *scale_by) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < width; j += 8) m = _mm256_max_ps(m, _mm256_load_ps(scores + j));
    const float block_peak = max_lanes(m);
    const float new_peak = block_peak > *peak ? block_peak : *peak;
    if (new_peak == -INFINITY) {  /* every key so far masked: nothing to add */
        memset(scores, 0, sizeof(float) * width);
        *scale_by = 1.0f;
        return;
    }
    *scale_by = *peak == -INFINITY ? 0.0f : expf(*peak - new_peak);
    const __m256 shift = _mm256_set1_ps(new_peak), minus_inf = _mm256_set1_ps(-INFINITY);
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < width; j += 8) {
        const __m256 s = _mm256_load_ps(scores + j);
        const __m256 masked = _mm256_cmp_ps(s, minus_inf, _CMP_EQ_OQ);
        const __m256 p = _mm256_andnot_ps(masked, exp_nonpositive(_mm256_sub_ps(s, shift)));
        _mm256_store_ps(scores + j, p);
        total = _mm256_add_ps(total, p);
    }
    *sum = *sum * *scale_by + sum_lanes_f32(total);
    *peak = new_peak;
}

static void attend_block(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                         int64_t page_stride, int64_t token_stride, int64_t page_tokens, const int64_t *tables,
                         int64_t table_stride, int64_t slot, int64_t start, int64_t i0, int64_t i1, int64_t h,
                         int64_t group, int64_t head_dim, int64_t window, float scale, float *out, int64_t out_stride,
                         Scratch *s) {
    const int64_t rows = (i1 - i0) * group;
    const float *query[MAX_ROWS];
    int64_t positions[MAX_ROWS];
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t i = i0 + row / group, g = row % group;
        query[row] = q + i * q_stride + (h * group + g) * head_dim;
        positions[row] = start + i;
        s->peak[row] = -INFINITY;
        s->sum[row] = 0.0f;
    }
    memset(s->acc, 0, sizeof(float) * rows * head_dim);
    const int64_t last = start + i1 - 1;  /* the block's last query position: no row sees a later key */
    int64_t first = window > 0 ? start + i0 - window + 1 : 0;
    if (first < 0) first = 0;
    for (int64_t k0 = first; k0 <= last; k0 += KEY_BLOCK) {
        const int64_t count = last - k0 + 1 < KEY_BLOCK ? last - k0 + 1 : KEY_BLOCK;
        for (int64_t j = 0; j < count; ++j) {
            const int64_t at = row_at(tables, table_stride, slot, page_stride, page_tokens, token_stride, k0 + j)
                               + h * head_dim;
            const float *key = k_cache + at;
            for (int64_t d = 0; d < head_dim; ++d) s->keys[d * KEY_BLOCK + j] = key[d];
            s->values[j] = v_cache + at;
        }
        const int64_t groups = (count + 15) / 16, width = 16 * groups;  /* whole groups of 16 keys */
        for (int64_t j = count; j < width; ++j)  /* masked below; finite, so the dots stay finite */
            for (int64_t d = 0; d < head_dim; ++d) s->keys[d * KEY_BLOCK + j] = 0.0f;
        const int64_t block_last = k0 + count - 1;
        for (int64_t g16 = 0; g16 < groups; ++g16) {
            int64_t r0 = 0;
            for (; r0 + 4 <= rows; r0 += 4)
                score_rows(query, s->keys, s->scores, positions, r0, g16, k0, block_last, window, head_dim, scale, 4);
            for (; r0 < rows; ++r0)
                score_rows(query, s->keys, s->scores, positions, r0, g16, k0, block_last, window, head_dim, scale, 1);
        }
        for (int64_t row = 0; row < rows; ++row)
            softmax_row(s->scores + row * KEY_BLOCK, width, s->peak + row, s->sum + row, s->scale_by + row);
        for (int64_t d0 = 0; d0 < head_dim; d0 += 32) {
            int64_t r0 = 0;
            for (; r0 + 3 <= rows; r0 += 3)
                value_rows(s->scores, s->values, s->scale_by, s->acc, head_dim, r0, d0, count, 3);
            for (; r0 < rows; ++r0)
                value_rows(s->scores, s->values, s->scale_by, s->acc, head_dim, r0, d0, count, 1);
        }
    }
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t i = i0 + row / group, g = row % group;
        const __m256 inverse = _mm256_set1_ps(1.0f / s->sum[row]);
        float *target = out + i * out_stride + (h * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; d += 8)
            _mm256_storeu_ps(target + d, _mm256_mul_ps(_mm256_load_ps(s->acc + row * head_dim + d), inverse));
    }
}

/* prefill_attention_bf16's contract (csrc/prefill_attention.c) in fp32: chunk c's query rows are q rows
 * [offsets[c], offsets[c] + lens[c]) (row stride q_stride elements; heads contiguous), its tokens at positions
 * starts[c]... of the sequence in slot slots[c]; out has the same row shape (stride out_stride). Returns 0; -1
 * for a shape it does not take (head_dim not a multiple of 32 up to 256, group above 8) or when out of memory;
 * nothing is written then. */
int64_t prefill_attention_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                              int64_t page_stride, int64_t token_stride, int64_t page_tokens, const int64_t *tables,
                              int64_t table_stride, const int64_t *slots, const int64_t *starts, const int64_t *offsets,
                              const int64_t *lens, int64_t num_chunks, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim, int64_t window, float scale, float *out, int64_t out_stride,
                              int64_t num_threads) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads) return -1;
    const int64_t group = num_heads / num_kv_heads;
    if (head_dim % 32 != 0 || head_dim > MAX_HEAD_DIM || group > MAX_GROUP) return -1;
    const int64_t num_tasks = prefill_num_tasks(lens, num_chunks, num_kv_heads);
    int failed = 0;
    #pragma omp parallel num_threads(num_threads)
    {
        Scratch scratch;  /* each thread's own; if any thread lacks memory, no thread writes */
        if (!scratch_init(&scratch, head_dim)) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
        #pragma omp barrier
        if (!__atomic_load_n(&failed, __ATOMIC_RELAXED)) {
            #pragma omp for schedule(dynamic, 1)
            for (int64_t index = 0; index < num_tasks; ++index) {
                const PrefillTask task = prefill_task(index, lens, num_kv_heads);
                attend_block(q + offsets[task.chunk] * q_stride, q_stride, k_cache, v_cache, page_stride,
                             token_stride, page_tokens, tables, table_stride, slots[task.chunk], starts[task.chunk],
                             task.first, task.last, task.head, group, head_dim, window, scale,
                             out + offsets[task.chunk] * out_stride, out_stride, &scratch);
            }
        }
        scratch_free(&scratch);
    }
    return failed ? -1 : 0;
}

int64_t prefill_attention_f32_available(void) { return 1; }
#else
int64_t prefill_attention_f32_available(void) { return 0; }
#endif
