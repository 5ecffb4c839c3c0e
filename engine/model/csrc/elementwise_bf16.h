/* The bf16 elementwise ops' per-row routines (see elementwise_bf16.c), shared with the fused decode step
 * (decode_step_bf16.c) so both round the same way. */
#ifndef ELASTIC_ELEMENTWISE_BF16_H
#define ELASTIC_ELEMENTWISE_BF16_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../../csrc/simd_exp.h"

static inline float bf16_to_f32(uint16_t value) {
    uint32_t bits = ((uint32_t)value) << 16;
    float out;
    memcpy(&out, &bits, sizeof(out));
    return out;
}

static inline uint16_t f32_to_bf16(float value) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float round_bf16(float value) { return bf16_to_f32(f32_to_bf16(value)); }

/* hidden += delta (if delta), then out = (hidden * rsqrt(mean(hidden^2) + eps)) * weight, row by row */
static void add_rms_norm_row(uint16_t *row, const uint16_t *add, const uint16_t *weight, uint16_t *target,
                             int64_t width, float eps) {
    int64_t i = 0;
    float total = 0.f;
#if defined(__AVX512F__)
    /* the same roundings 16 at a time; only the order of the fp32 sum of squares differs */
    __m512 squares = _mm512_setzero_ps();
    for (; i < width; i += 16) {
        const __mmask16 mask = width - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (width - i)) - 1u);
        __m512 value = bf16x16_to_ps(_mm256_maskz_loadu_epi16(mask, row + i));
        if (add != NULL) {
            value = round_bf16_ps(_mm512_add_ps(value, bf16x16_to_ps(_mm256_maskz_loadu_epi16(mask, add + i))));
            _mm256_mask_storeu_epi16(row + i, mask, ps_to_bf16x16(value));
        }
        squares = _mm512_fmadd_ps(value, value, squares);
    }
    total = _mm512_reduce_add_ps(squares);
    const float scale = 1.f / sqrtf(total / (float)width + eps);
    for (i = 0; i < width; i += 16) {
        const __mmask16 mask = width - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (width - i)) - 1u);
        const __m512 value = bf16x16_to_ps(_mm256_maskz_loadu_epi16(mask, row + i));
        const __m512 scaled = round_bf16_ps(_mm512_mul_ps(value, _mm512_set1_ps(scale)));
        const __m512 w = bf16x16_to_ps(_mm256_maskz_loadu_epi16(mask, weight + i));
        _mm256_mask_storeu_epi16(target + i, mask, ps_to_bf16x16(_mm512_mul_ps(scaled, w)));
    }
#else
    if (add != NULL)
        for (i = 0; i < width; ++i) row[i] = f32_to_bf16(bf16_to_f32(row[i]) + bf16_to_f32(add[i]));
    for (i = 0; i < width; ++i) {
        const float value = bf16_to_f32(row[i]);
        total += value * value;
    }
    const float scale = 1.f / sqrtf(total / (float)width + eps);
    for (i = 0; i < width; ++i)
        target[i] = f32_to_bf16(round_bf16(bf16_to_f32(row[i]) * scale) * bf16_to_f32(weight[i]));
#endif
}

/* one head of 2 * half values rotated in place by the cos/sin rows c and s (the same roundings as
 * engine/model/rope.py's apply_rope in bf16) */
static inline void rope_head(uint16_t *head, const uint16_t *c, const uint16_t *s, int64_t half) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= half; i += 16) {  /* the same roundings, 16 at a time */
        const __m512 first = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(head + i)));
        const __m512 second = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(head + i + half)));
        const __m512 c0 = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(c + i)));
        const __m512 c1 = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(c + i + half)));
        const __m512 s0 = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(s + i)));
        const __m512 s1 = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(s + i + half)));
        const __m512 negated = _mm512_sub_ps(_mm512_setzero_ps(), second);
        const __m512 new_first = _mm512_add_ps(round_bf16_ps(_mm512_mul_ps(first, c0)),
                                               round_bf16_ps(_mm512_mul_ps(negated, s0)));
        const __m512 new_second = _mm512_add_ps(round_bf16_ps(_mm512_mul_ps(second, c1)),
                                                round_bf16_ps(_mm512_mul_ps(first, s1)));
        _mm256_storeu_si256((__m256i *)(head + i), ps_to_bf16x16(new_first));
        _mm256_storeu_si256((__m256i *)(head + i + half), ps_to_bf16x16(new_second));
    }
#endif
    for (; i < half; ++i) {
        const float first = bf16_to_f32(head[i]), second = bf16_to_f32(head[i + half]);
        const float new_first = round_bf16(first * bf16_to_f32(c[i])) + round_bf16(-second * bf16_to_f32(s[i]));
        const float new_second = round_bf16(second * bf16_to_f32(c[i + half])) +
                                 round_bf16(first * bf16_to_f32(s[i + half]));
        head[i] = f32_to_bf16(new_first);
        head[i + half] = f32_to_bf16(new_second);
    }
}

/* target[j] = silu(gate[j]) * up[j] for j in [first, last) (elementwise: any split of the columns gives the
 * same values) */
static inline void silu_mul_columns(const uint16_t *gate, const uint16_t *up, uint16_t *target, int64_t first,
                                    int64_t last) {
    int64_t j = first;
#if defined(__AVX512F__)
    /* the same roundings, 16 at a time with a vector exp (scalar expf does not vectorise) */
    for (; j + 16 <= last; j += 16) {
        const __m512 g = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(gate + j)));
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp512_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        const __m512 u = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(up + j)));
        _mm256_storeu_si256((__m256i *)(target + j), ps_to_bf16x16(_mm512_mul_ps(round_bf16_ps(silu), u)));
    }
#endif
    for (; j < last; ++j) {
        const float g = bf16_to_f32(gate[j]);
        target[j] = f32_to_bf16(round_bf16(g / (1.f + expf(-g))) * bf16_to_f32(up[j]));
    }
}
#endif
