/* The fp32 decoder's elementwise routines, one row at a time: residual add + RMSNorm, RoPE on one head, SiLU(gate)
 * x up, and a vector exp for non-positive arguments (softmax, SiLU). Used by the per-op kernels
 * (csrc/elementwise_f32.c) and the fused fp32 decode step (csrc/decode_step_f32.c).
 *
 * The residual add, the norm's two scalings and RoPE round as torch's fp32 ops do (built without FMA
 * contraction, -std=c11); the norm's mean and SiLU's exp are summed and rounded their own way, a few ulps from
 * torch's (greedy tokens held to transformers' by the engine's exactness tests). */
#ifndef ELEMENTWISE_F32_H
#define ELEMENTWISE_F32_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "../../csrc/simd_exp.h"  /* exp_nonpositive, sum_lanes_f32 */

/* hidden += delta (skipped for NULL); out = hidden * (1 / sqrt(mean(hidden^2) + eps)) * weight, rounding
 * where torch's fp32 ops round */
static inline void add_rms_norm_row(float *hidden, const float *delta, const float *weight, float *out, int64_t width,
                             float eps) {
    if (delta != NULL)
        for (int64_t j = 0; j < width; ++j) hidden[j] = hidden[j] + delta[j];
    __m256 squares = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= width; j += 8) {
        const __m256 v = _mm256_loadu_ps(hidden + j);
        squares = _mm256_add_ps(squares, _mm256_mul_ps(v, v));
    }
    float total = sum_lanes_f32(squares);
    for (; j < width; ++j) total += hidden[j] * hidden[j];
    const float inverse = 1.0f / sqrtf(total / (float)width + eps);
    for (j = 0; j < width; ++j) out[j] = (hidden[j] * inverse) * weight[j];
}

/* x [d] rotated in place: x * cos + rotate_half(x) * sin (transformers' form, same roundings) */
static inline void rope_head(float *x, const float *cos, const float *sin, int64_t half) {
    for (int64_t j = 0; j < half; ++j) {
        const float low = x[j], high = x[j + half];
        x[j] = low * cos[j] + (-high) * sin[j];
        x[j + half] = high * cos[j + half] + low * sin[j + half];
    }
}

/* act[j] = silu(gate[j]) * up[j] for j in [from, to) */
static inline void silu_mul_columns(const float *gate, const float *up, float *act, int64_t from, int64_t to) {
    int64_t j = from;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; j + 8 <= to; j += 8) {
        const __m256 g = _mm256_loadu_ps(gate + j);
        const __m256 e = exp_nonpositive(_mm256_or_ps(g, sign));  /* exp(-|g|) */
        /* sigmoid(g) = 1 / (1 + exp(-g)); for g < 0 it is exp(g) / (1 + exp(g)), no overflow either way */
        const __m256 negative = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
        const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(one, e, negative), _mm256_add_ps(one, e));
        _mm256_storeu_ps(act + j, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + j)));
    }
    for (; j < to; ++j) act[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
}

#endif
