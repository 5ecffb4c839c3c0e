/* One sequence's decode attention over a bf16 cache with AVX512-BF16 (see decode_attention.c), shared with
 * the fused decode step (engine/model/csrc/decode_step_bf16.c) so both give the same bits. */
#ifndef ELASTIC_DECODE_ATTENTION_BF16_H
#define ELASTIC_DECODE_ATTENTION_BF16_H
#include <math.h>
#include <stdint.h>

#include "../../csrc/simd_exp.h"

#define MAX_GROUP 7   /* group * 4 value accumulators + 4 loaded values fit the 32 vector registers */

/* The 16 horizontal sums of v[0..15] in one vector (lane t: the sum of v[t]), each added in the tree order of
 * gcc's _mm512_reduce_add_ps (lanes i + 8 onto i, then + 4, then + 2, then + 1), so each equals
 * _mm512_reduce_add_ps(v[t]) bit for bit, at ~3 operations per sum instead of ~9. */
static inline __m512 sum16_ps(const __m512 v[16]) {
    __m512 w[8], x[4], y[2];
    for (int k = 0; k < 8; ++k)  /* lanes 0-7: v[2k][i] + v[2k][i + 8]; lanes 8-15: the same of v[2k + 1] */
        w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44));
    for (int k = 0; k < 4; ++k)  /* 128-bit block j: token 4k + j's four partial sums (+ 4) */
        x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD),
                             _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88));
    for (int k = 0; k < 2; ++k)  /* block j: two partial sums (+ 2) of token 8k + j, then of token 8k + 4 + j */
        y[k] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * k], x[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(x[2 * k], x[2 * k + 1], 0xEE));
    /* block j: the sums (+ 1) of tokens j, 4 + j, 8 + j, 12 + j; then into token order */
    const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), z);
}

/* The dot products of 16 tokens' keys (token i's row at keys + offsets[i]) with one query head (`chunks`
 * vectors of 32 bf16), lane i token i's, each summed as _mm512_reduce_add_ps would. */
static inline __attribute__((always_inline)) __m512 dot16_bf16(const uint16_t *keys, const int64_t *offsets,
                                                               const __m512bh *q, const int64_t chunks) {
    __m512 dot[16];
    for (int i = 0; i < 16; ++i) {
        const uint16_t *key = keys + offsets[i];
        dot[i] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c)
            dot[i] = _mm512_dpbf16_ps(dot[i], (__m512bh)_mm512_loadu_si512(key + c * 32), q[c]);
    }
    return sum16_ps(dot);
}

/* The largest of line[0..count), NaNs skipped (as `x > peak ? x : peak` would: vmaxps returns its second
 * operand when the first is NaN); 16 lanes at a time, so no chain of scalar compares. */
static inline float max_ps(const float *line, int64_t count) {
    __m512 peaks = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= count; t += 16) peaks = _mm512_max_ps(_mm512_loadu_ps(line + t), peaks);
    float peak = _mm512_reduce_max_ps(peaks);
    for (; t < count; ++t) peak = line[t] > peak ? line[t] : peak;
    return peak;
}

/* Keys and values stream from memory (a batch's K/V is far larger than the CPU's caches); the hardware
 * prefetchers stop at every 4 KiB page, so the kernel fetches rows PREFETCH_TOKENS tokens ahead itself */
#define PREFETCH_TOKENS 32

static inline void prefetch_rows(const uint16_t *base, const int64_t *offsets, int64_t count, int64_t bytes) {
    for (int64_t i = 0; i < count; ++i) {
        const char *row = (const char *)(base + offsets[i]);
        for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
    }
}

/* One sequence of the bf16 cache with AVX512-BF16; token start + t's row is at offsets[t]. q holds bf16
 * values widened to fp32 (the model's q is bf16), so narrowing it back is exact and vdpbf16ps forms each
 * q.k product exactly, summed in fp32. Scores: per token and key/value head, the head's key is read once
 * (head_dim / 32 vectors) and dotted with the group's queries, 16 tokens at a time (sum16_ps). Softmax with a
 * vector exp; the 1 / sum is applied once at the end. Values: per key/value head and 64-wide column block, the group's accumulators
 * stay in registers over all tokens. */
static void decode_one_bf16(const float *query, const uint16_t *keys, const uint16_t *values,
                            const int64_t *offsets, int64_t count, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, float scale, float *scores, __m512bh *q_bf16, float *out) {
    const int64_t group = num_heads / num_kv_heads, chunks = head_dim / 32;
    for (int64_t hg = 0; hg < num_heads; ++hg)
        for (int64_t c = 0; c < chunks; ++c) {
            const float *source = query + hg * head_dim + c * 32;
            q_bf16[hg * chunks + c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(source + 16), _mm512_loadu_ps(source));
        }
    const int64_t row_bytes = 2 * num_kv_heads * head_dim;  /* a token's keys (or values) of these heads */
    int64_t t = 0;
    for (; t + 16 <= count; t += 16) {  /* 16 tokens' scores at once, summed as one token's below */
        if (t + PREFETCH_TOKENS + 16 <= count) prefetch_rows(keys, offsets + t + PREFETCH_TOKENS, 16, row_bytes);
        for (int64_t h = 0; h < num_kv_heads; ++h)
            for (int64_t g = 0; g < group; ++g) {
                const int64_t hg = h * group + g;
                const __m512bh *q = q_bf16 + hg * chunks;
                /* a constant chunk count keeps the 16 sums in registers (SmolLM2's head_dim 64: 2 chunks) */
                const __m512 dots = chunks == 2 ? dot16_bf16(keys + h * head_dim, offsets + t, q, 2)
                                                : dot16_bf16(keys + h * head_dim, offsets + t, q, chunks);
                _mm512_storeu_ps(scores + hg * count + t, _mm512_mul_ps(dots, _mm512_set1_ps(scale)));
            }
    }
    for (; t < count; ++t) {
        const uint16_t *row = keys + offsets[t];
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
        float peak = max_ps(line, count);
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
            const uint16_t *column = values + h * head_dim + block;
            for (int64_t t = 0; t < count; ++t) {
                if (t + PREFETCH_TOKENS < count) prefetch_rows(column, offsets + t + PREFETCH_TOKENS, 1, 64 * sizeof(uint16_t));  /* the block's 64 values */
                __m512 v[4];
                for (int i = 0; i < 4; ++i)
                    v[i] = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(column + offsets[t] + 16 * i)));
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

#endif
