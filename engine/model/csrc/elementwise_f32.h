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

/* the 8 lanes' sum, in a fixed order */
static inline float sum_lanes_f32(__m256 v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

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

/* exp(x) for x <= 0 (softmax, SiLU's exp(-|x|)): 2^n * p(r), a degree-6 polynomial on r in [-ln2/2, ln2/2],
 * within 2 ulp of expf; below -87 it returns 0 */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
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
