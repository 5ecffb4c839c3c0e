/* Prefill attention over a bf16 KV cache with AVX512-BF16: every prompt chunk of a step in one call.
 *
 * The chunk's query tokens attend causally (and within a sliding window, if any) to their sequence's cache,
 * which already holds the chunk's own K/V (the store comes first). Rows are read in place from either KV
 * layout, addressed as in decode_attention.c: token t of the sequence in slot s is at
 * tables[s * table_stride + t / P] * page_stride + (t % P) * token_stride (paged), or
 * s * page_stride + t * token_stride (contiguous, tables == NULL).
 *
 * Why a kernel: torch's scaled_dot_product_attention on CPU ran these shapes (128-token chunks, 9 query and 3
 * key/value heads of 64) at ~20 GFLOP/s, one call per chunk: 19% of a 2,048-token prefill step of SmolLM2
 * in bf16 on a 2-core AVX512-BF16 box. Here both products are GEMM-shaped and run on vdpbf16ps.
 *
 * One task = (chunk, key/value head, block of QUERY_BLOCK query tokens; prefill_tasks.h); its rows are the
 * block's tokens x the group's query heads, which share the head's keys. Flash-style over blocks of KEY_BLOCK keys:
 *   1. the block's keys are repacked for vdpbf16ps with the keys in the lanes ([key / 16][dim pair][16]
 *      32-bit words), its values with pairs of keys side by side ([key pair][dim][2]);
 *   2. scores s = q . k * scale, fp32 sums of exact bf16 products, masked keys -inf;
 *   3. online softmax per row in fp32 (running max m and sum l; the output rescaled when m grows); the
 *      probabilities are rounded to bf16 for the second product, as torch's bf16 CPU flash attention does;
 *   4. o += p . v on vdpbf16ps, fp32 accumulators; at the end out = bf16(o / l), rounded to nearest even.
 * The result equals SDPA's up to the order of fp32 sums and that rounding (tests/engine/attention).
 *
 * On CPUs with AMX both products run on tiles instead (`prefill_attention_set_tiles`, on by default where the
 * kernel grants the tile state): the repacked keys ([dim pair][16 keys] words per 16 keys) and values ([key
 * pair][dim][2]) are already the B-tile layouts of tdpbf16ps, the block's query rows are copied once into a
 * [rows][head_dim] buffer (the A tiles), and the rows are padded to 16 (the padding rows' results are never
 * read). Same roundings, another order of fp32 sums. */
#define _GNU_SOURCE  /* syscall */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#include <omp.h>

#include "../../csrc/simd_exp.h"
#include "prefill_tasks.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define PREFILL_TILES 1
#endif

#define QUERY_BLOCK PREFILL_QUERY_BLOCK
#define KEY_BLOCK 128
#define MAX_GROUP 8
#define MAX_HEAD_DIM 256

typedef struct {
    uint32_t *keys;    /* [KEY_BLOCK / 16][head_dim / 2][16]: a key's (2p, 2p+1) dims as one word per lane */
    uint16_t *values;  /* [KEY_BLOCK / 2][head_dim][2]: keys 2j and 2j+1 side by side per dim */
    float *scores;     /* [rows][KEY_BLOCK] */
    uint16_t *probs;   /* [rows][KEY_BLOCK] bf16 */
    float *acc;        /* [rows][head_dim] */
    float *peak, *sum; /* [rows] */
    uint16_t *query;   /* [rows][head_dim]: the block's query rows, the A tiles (tiles only) */
} Scratch;

/* 1 while the products run on AMX tiles (prefill_attention_set_tiles) */
static int use_tiles = 0;

static int scratch_init(Scratch *s, int64_t rows, int64_t head_dim) {
    rows = (rows + 15) & ~(int64_t)15;  /* whole tiles of rows */
    s->query = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * rows * head_dim);
    s->keys = (uint32_t *)aligned_alloc(64, sizeof(uint16_t) * KEY_BLOCK * head_dim);
    s->values = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * KEY_BLOCK * head_dim);
    s->scores = (float *)aligned_alloc(64, sizeof(float) * rows * KEY_BLOCK);
    s->probs = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * rows * KEY_BLOCK);
    s->acc = (float *)aligned_alloc(64, sizeof(float) * rows * head_dim);
    s->peak = (float *)malloc(sizeof(float) * rows);
    s->sum = (float *)malloc(sizeof(float) * rows);
    return s->keys && s->values && s->scores && s->probs && s->acc && s->peak && s->sum && s->query;
}

static void scratch_free(Scratch *s) {
    free(s->keys), free(s->values), free(s->scores), free(s->probs), free(s->acc), free(s->peak), free(s->sum);
    free(s->query);
}

/* o[r] += p[r] . v for NR rows from r0, over `pairs` key pairs; DV = head_dim / 16 vectors per row. NR and DV
 * are compile-time constants at every call, so the NR x DV accumulators stay in registers. */
static inline __attribute__((always_inline)) void value_rows(const uint16_t *probs, const uint16_t *values,
                                                             float *acc, int64_t r0, int64_t pairs, const int NR,
                                                             const int DV) {
    __m512 a[NR][DV];
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < DV; ++v) a[r][v] = _mm512_loadu_ps(acc + (r0 + r) * DV * 16 + 16 * v);
    for (int64_t j = 0; j < pairs; ++j) {
        __m512bh vv[DV];
        for (int v = 0; v < DV; ++v) vv[v] = (__m512bh)_mm512_load_si512(values + (j * DV * 16 + 16 * v) * 2);
        for (int r = 0; r < NR; ++r) {
            const __m512bh p = (__m512bh)_mm512_set1_epi32(((const int32_t *)(probs + (r0 + r) * KEY_BLOCK))[j]);
            for (int v = 0; v < DV; ++v) a[r][v] = _mm512_dpbf16_ps(a[r][v], p, vv[v]);
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < DV; ++v) _mm512_storeu_ps(acc + (r0 + r) * DV * 16 + 16 * v, a[r][v]);
}

/* value_rows over rows [0, rows): RB rows at a time (RB x DV accumulators + DV values fit 32 registers), the
 * rest one row at a time */
static inline __attribute__((always_inline)) void add_values(const uint16_t *probs, const uint16_t *values,
                                                             float *acc, int64_t rows, int64_t pairs, const int DV) {
    const int RB = DV <= 4 ? 6 : DV <= 8 ? 3 : 1;
    int64_t r0 = 0;
    for (; r0 + RB <= rows; r0 += RB) value_rows(probs, values, acc, r0, pairs, RB, DV);
    for (; r0 < rows; ++r0) value_rows(probs, values, acc, r0, pairs, 1, DV);
}

/* scores[row][16 keys at g16] = dot * scale, keys after the row's position, past its window or after the
 * block's last key -inf */
static inline void store_scores(float *scores, int64_t row, int64_t i0, int64_t group, int64_t g16, int64_t start,
                                int64_t window, __m512i lane_key, __m512i last_key, float scale, __m512 dot) {
    const int64_t position = start + i0 + row / group;
    __mmask16 ok = _mm512_cmple_epi32_mask(lane_key, _mm512_set1_epi32((int)position)) &
                   _mm512_cmple_epi32_mask(lane_key, last_key);
    if (window > 0) ok &= _mm512_cmpgt_epi32_mask(lane_key, _mm512_set1_epi32((int)(position - window)));
    _mm512_storeu_ps(scores + row * KEY_BLOCK + 16 * g16,
                     _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), ok, _mm512_mul_ps(dot, _mm512_set1_ps(scale))));
}

/* the positions of the 16 keys of group g16 of the key block from k0, lane by lane */
static inline __m512i lane_keys(int64_t k0, int64_t g16) {
    return _mm512_add_epi32(_mm512_set1_epi32((int)(k0 + 16 * g16)),
                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

/* scores[r][16 keys at g16] = q_r . k * scale for NR rows from r0, masked keys -inf (NR: a constant) */
static inline __attribute__((always_inline)) void score_rows(const uint16_t *q, int64_t q_stride, const uint32_t *keys,
                                                             float *scores, int64_t r0, int64_t i0, int64_t h,
                                                             int64_t group, int64_t head_dim, int64_t g16, int64_t start, int64_t window,
                                                             __m512i lane_key, __m512i last_key, float scale,
                                                             const int NR) {
    const int64_t words = head_dim / 2;  /* bf16 pairs per row */
    const int32_t *qrow[NR];
    __m512 dot[NR];
    for (int r = 0; r < NR; ++r) {
        const int64_t row = r0 + r, i = i0 + row / group, g = row % group;
        qrow[r] = (const int32_t *)(q + i * q_stride + (h * group + g) * head_dim);
        dot[r] = _mm512_setzero_ps();
    }
    for (int64_t w = 0; w < words; ++w) {
        const __m512bh kv = (__m512bh)_mm512_load_si512(keys + w * 16);
        for (int r = 0; r < NR; ++r) dot[r] = _mm512_dpbf16_ps(dot[r], (__m512bh)_mm512_set1_epi32(qrow[r][w]), kv);
    }
    for (int r = 0; r < NR; ++r)
        store_scores(scores, r0 + r, i0, group, g16, start, window, lane_key, last_key, scale, dot[r]);
}

/* rows a and b (NULL: zeros) of `count` values interleaved: out[2d + e] = (e ? b : a)[d] */
static inline void interleave_rows(const uint16_t *a, const uint16_t *b, int64_t count, uint16_t *out) {
    const __m512i low = _mm512_setr_epi32(0x00200000, 0x00210001, 0x00220002, 0x00230003, 0x00240004, 0x00250005,
                                          0x00260006, 0x00270007, 0x00280008, 0x00290009, 0x002a000a, 0x002b000b,
                                          0x002c000c, 0x002d000d, 0x002e000e, 0x002f000f);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    for (int64_t d = 0; d < count; d += 32) {
        const __m512i x = a ? _mm512_loadu_si512(a + d) : _mm512_setzero_si512();
        const __m512i y = b ? _mm512_loadu_si512(b + d) : _mm512_setzero_si512();
        _mm512_store_si512(out + 2 * d, _mm512_permutex2var_epi16(x, low, y));
        _mm512_store_si512(out + 2 * d + 32, _mm512_permutex2var_epi16(x, high, y));
    }
}

#ifdef PREFILL_TILES
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* tiles 0 (fp32 sums), 4 (A) and 6 (B), each 16 rows of 64 bytes */
static void tiles_on(void) {
    TileConfig config;
    memset(&config, 0, sizeof(config));
    config.palette = 1;
    for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
}

/* the raw sums q . k of rows [0, rows16) and keys [0, nk16) into scores (before scale and mask) */
static void score_tiles(const uint16_t *query, const uint32_t *keys, float *scores, int64_t rows16, int64_t nk16,
                        int64_t head_dim) {
    const int64_t words = head_dim / 2;
    for (int64_t r0 = 0; r0 < rows16; r0 += 16)
        for (int64_t g16 = 0; g16 < nk16 / 16; ++g16) {
            _tile_zero(0);
            for (int64_t c = 0; c < head_dim / 32; ++c) {  /* 32 dims: 16 dim pairs, a B tile's rows */
                _tile_loadd(4, query + r0 * head_dim + 32 * c, head_dim * 2);
                _tile_loadd(6, keys + g16 * words * 16 + c * 16 * 16, 64);
                _tile_dpbf16ps(0, 4, 6);
            }
            _tile_stored(0, scores + r0 * KEY_BLOCK + 16 * g16, KEY_BLOCK * 4);
        }
}

/* acc[r] += probs[r] . values for rows [0, rows16) over keys [0, nk32) (probs and values zero past the block's
 * keys), 16 dims per tile */
static void value_tiles(const uint16_t *probs, const uint16_t *values, float *acc, int64_t rows16, int64_t nk32,
                        int64_t head_dim) {
    for (int64_t r0 = 0; r0 < rows16; r0 += 16)
        for (int64_t d0 = 0; d0 < head_dim; d0 += 16) {
            _tile_loadd(0, acc + r0 * head_dim + d0, head_dim * 4);
            for (int64_t k0 = 0; k0 < nk32; k0 += 32) {  /* 16 key pairs: a B tile's rows */
                _tile_loadd(4, probs + r0 * KEY_BLOCK + k0, KEY_BLOCK * 2);
                _tile_loadd(6, values + (k0 / 2 * head_dim + d0) * 2, head_dim * 4);
                _tile_dpbf16ps(0, 4, 6);
            }
            _tile_stored(0, acc + r0 * head_dim + d0, head_dim * 4);
        }
}
#endif

/* One task: query tokens [i0, i1) of a chunk (positions start + i), key/value head h. */
static void attend_block(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                         int64_t page_stride, int64_t token_stride, int64_t page_tokens, const int64_t *tables,
                         int64_t table_stride, int64_t slot, int64_t start, int64_t i0, int64_t i1, int64_t h,
                         int64_t group, int64_t head_dim, int64_t window, float scale, uint16_t *out,
                         int64_t out_stride, Scratch *s) {
    const int64_t rows = (i1 - i0) * group, words = head_dim / 2, dv = head_dim / 16;
    const int64_t rows16 = (rows + 15) & ~(int64_t)15;
    const int64_t first_key = window > 0 && start + i0 - window + 1 > 0 ? start + i0 - window + 1 : 0;
    const int64_t end_key = start + i1;
    const int tiles = use_tiles;
    for (int64_t r = 0; r < rows; ++r) s->peak[r] = -INFINITY, s->sum[r] = 0.f;
    memset(s->acc, 0, sizeof(float) * (tiles ? rows16 : rows) * head_dim);
#ifdef PREFILL_TILES
    if (tiles) {  /* the block's query rows as A tiles; padding rows zero */
        for (int64_t row = 0; row < rows16; ++row) {
            uint16_t *target = s->query + row * head_dim;
            if (row < rows)
                memcpy(target, q + (i0 + row / group) * q_stride + (h * group + row % group) * head_dim,
                       sizeof(uint16_t) * head_dim);
            else
                memset(target, 0, sizeof(uint16_t) * head_dim);
        }
        tiles_on();
    }
#endif
    for (int64_t k0 = first_key; k0 < end_key; k0 += KEY_BLOCK) {
        const int64_t nk = end_key - k0 < KEY_BLOCK ? end_key - k0 : KEY_BLOCK, nk16 = (nk + 15) & ~15;
        const int64_t nk32 = (nk + 31) & ~31, packed_values = tiles ? nk32 : nk16;  /* tiles take 32 keys */
        /* 1. repack (padding keys: zero values; their scores are masked) */
        const uint16_t *value_rows_at[KEY_BLOCK];
        for (int64_t j = 0; j < packed_values; ++j) {
            const uint32_t *key = NULL;
            value_rows_at[j] = NULL;
            if (j < nk) {
                const int64_t at = row_at(tables, table_stride, slot, page_stride, page_tokens, token_stride, k0 + j) + h * head_dim;
                key = (const uint32_t *)(k_cache + at);
                value_rows_at[j] = v_cache + at;
            }
            if (j >= nk16) continue;
            uint32_t *kd = s->keys + (j / 16) * words * 16 + (j % 16);
            for (int64_t w = 0; w < words; ++w) kd[w * 16] = key ? key[w] : 0u;
        }
        for (int64_t j = 0; j < packed_values; j += 2)
            interleave_rows(value_rows_at[j], value_rows_at[j + 1], head_dim, s->values + j * head_dim);
        /* 2. scores, 16 keys x 8 rows at a time (or on tiles, then scaled and masked) */
        const __m512i last_key = _mm512_set1_epi32((int)(k0 + nk - 1));
#ifdef PREFILL_TILES
        if (tiles) {
            score_tiles(s->query, s->keys, s->scores, rows16, nk16, head_dim);
            for (int64_t row = 0; row < rows; ++row)
                for (int64_t g16 = 0; g16 < nk16 / 16; ++g16)
                    store_scores(s->scores, row, i0, group, g16, start, window, lane_keys(k0, g16), last_key, scale,
                                 _mm512_loadu_ps(s->scores + row * KEY_BLOCK + 16 * g16));
        }
#endif
        for (int64_t g16 = 0; !tiles && g16 < nk16 / 16; ++g16) {
            const __m512i lane_key = lane_keys(k0, g16);
            const uint32_t *kb = s->keys + g16 * words * 16;
            int64_t r0 = 0;
            for (; r0 + 8 <= rows; r0 += 8)
                score_rows(q, q_stride, kb, s->scores, r0, i0, h, group, head_dim, g16, start, window,
                           lane_key, last_key, scale, 8);
            for (; r0 < rows; ++r0)
                score_rows(q, q_stride, kb, s->scores, r0, i0, h, group, head_dim, g16, start, window,
                           lane_key, last_key, scale, 1);
        }
        /* 3. online softmax; probabilities to bf16 */
        for (int64_t row = 0; row < rows; ++row) {
            float *line = s->scores + row * KEY_BLOCK;
            __m512 top = _mm512_set1_ps(-INFINITY);
            for (int64_t t = 0; t < nk16; t += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(line + t));
            const float block_peak = _mm512_reduce_max_ps(top);
            uint16_t *probs = s->probs + row * KEY_BLOCK;
            if (block_peak == -INFINITY) {  /* every key of this block is masked for this row */
                memset(probs, 0, sizeof(uint16_t) * nk16);
                continue;
            }
            const float peak = s->peak[row] > block_peak ? s->peak[row] : block_peak;
            const float correction = s->peak[row] == -INFINITY ? 0.f : expf(s->peak[row] - peak);
            __m512 total = _mm512_setzero_ps();
            for (int64_t t = 0; t < nk16; t += 16) {
                const __m512 x = _mm512_loadu_ps(line + t);
                const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                const __m512 e = _mm512_maskz_mov_ps(live, exp512_ps(_mm512_sub_ps(x, _mm512_set1_ps(peak))));
                total = _mm512_add_ps(total, e);
                _mm256_storeu_si256((__m256i *)(probs + t), (__m256i)_mm512_cvtneps_pbh(e));
            }
            s->sum[row] = s->sum[row] * correction + _mm512_reduce_add_ps(total);
            s->peak[row] = peak;
            if (correction != 1.f) {  /* 0 on the row's first block: acc is still zero then */
                float *acc = s->acc + row * head_dim;
                for (int64_t d = 0; d < head_dim; d += 16)
                    _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), _mm512_set1_ps(correction)));
            }
        }
        /* 4. o += p . v */
#ifdef PREFILL_TILES
        if (tiles) {
            for (int64_t row = 0; row < rows; ++row)  /* keys past the block's 16s: zero probabilities */
                memset(s->probs + row * KEY_BLOCK + nk16, 0, sizeof(uint16_t) * (nk32 - nk16));
            value_tiles(s->probs, s->values, s->acc, rows16, nk32, head_dim);
            continue;
        }
#endif
        if (dv == 4) add_values(s->probs, s->values, s->acc, rows, nk16 / 2, 4);
        else if (dv == 8) add_values(s->probs, s->values, s->acc, rows, nk16 / 2, 8);
        else add_values(s->probs, s->values, s->acc, rows, nk16 / 2, 16);
    }
#ifdef PREFILL_TILES
    if (tiles) _tile_release();
#endif
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t i = i0 + row / group, g = row % group;
        const __m512 inverse = _mm512_set1_ps(1.f / s->sum[row]);
        uint16_t *target = out + i * out_stride + (h * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; d += 16)
            _mm256_storeu_si256((__m256i *)(target + d),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(s->acc + row * head_dim + d), inverse)));
    }
}

/* Attention of every prompt chunk: chunk c's query rows are q rows [offsets[c], offsets[c] + lens[c]) (row
 * stride q_stride elements; heads contiguous), its tokens at positions starts[c]... of the sequence in slot
 * slots[c]; out has the same row shape (stride out_stride). Returns 0; -1 for a shape it does not take
 * (head_dim not a multiple of 64 up to 256, group above 8) or when out of memory; nothing is written then. */
int64_t prefill_attention_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                               int64_t page_stride, int64_t token_stride, int64_t page_tokens, const int64_t *tables,
                               int64_t table_stride, const int64_t *slots, const int64_t *starts,
                               const int64_t *offsets, const int64_t *lens, int64_t num_chunks, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t window, float scale, uint16_t *out,
                               int64_t out_stride, int64_t num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    if (head_dim % 64 != 0 || head_dim > MAX_HEAD_DIM || group > MAX_GROUP || num_heads % num_kv_heads) return -1;
    const int64_t num_tasks = prefill_num_tasks(lens, num_chunks, num_kv_heads);
    Scratch *scratch = (Scratch *)calloc((size_t)num_threads, sizeof(Scratch));
    int ready = scratch != NULL;
    for (int64_t t = 0; ready && t < num_threads; ++t) ready = scratch_init(scratch + t, QUERY_BLOCK * group, head_dim);
    if (ready) {
        #pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
        for (int64_t index = 0; index < num_tasks; ++index) {
            const PrefillTask task = prefill_task(index, lens, num_kv_heads);
            const int64_t c = task.chunk;
            attend_block(q + offsets[c] * q_stride, q_stride, k_cache, v_cache, page_stride, token_stride,
                         page_tokens, tables, table_stride, slots[c], starts[c], task.first, task.last, task.head,
                         group, head_dim, window, scale, out + offsets[c] * out_stride, out_stride,
                         scratch + omp_get_thread_num());
        }
    }
    for (int64_t t = 0; scratch != NULL && t < num_threads; ++t) scratch_free(scratch + t);
    free(scratch);
    return ready ? 0 : -1;
}

int64_t prefill_attention_available(void) { return 1; }

/* Turns the AMX routines on (asking the kernel for the tile state: arch_prctl ARCH_REQ_XCOMP_PERM) or off;
 * returns 1 when they are on. Not while a call runs. */
int64_t prefill_attention_set_tiles(int64_t on) {
#ifdef PREFILL_TILES
    use_tiles = on && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    (void)on;
    use_tiles = 0;
#endif
    return use_tiles;
}
#else
int64_t prefill_attention_available(void) { return 0; }
int64_t prefill_attention_set_tiles(int64_t on) { (void)on; return 0; }
#endif
