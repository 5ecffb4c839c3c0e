/* exp(x) for 16 floats at once (AVX-512F), for the bf16 kernels' softmax and SiLU; and exp_nonpositive for 8
 * (AVX2/FMA), for the fp32 kernels' softmax and SiLU, with the 8-lane sum they share.
 *
 * Scalar expf in a loop does not vectorise without -ffast-math and cost the bf16 decode step most of its
 * SiLU and attention time (~20 cycles per call, millions of calls per step at batch 64). Range reduction
 * x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7, about
 * 1 ulp of fp32: far below the bf16 rounding every caller applies after), then 2^n by vscalefps, which
 * also gives 0 for large negative x and +inf for large positive x. */
#ifndef ELASTIC_SIMD_EXP_H
#define ELASTIC_SIMD_EXP_H
#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 exp512_ps(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* 16 bf16 (the low halves of fp32 bit patterns) to fp32, exactly */
static inline __m512 bf16x16_to_ps(__m256i values) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(values), 16));
}

/* fp32 to bf16, rounding to nearest even as torch does (NaN stays NaN). Where the CPU has AVX512_BF16 one
 * vcvtneps2bf16 does it: the same bits for every normal value, infinity and NaN (checked on 3.2e8 random
 * patterns), but a denormal input becomes a signed zero (torch keeps it): none of the callers' values is
 * that small in practice. The emulation below costs ~9 vector instructions, and the elementwise kernels
 * round two or three times per value (2048 x 576 residual add + RMSNorm, 2 threads: 0.51 -> 0.26 ms; the
 * engine alone, a burst of 32 x 129 prompts as served: 2.87 -> 2.55 s; docs/SPEED.md). */
#if defined(__AVX512BF16__)
static inline __m256i ps_to_bf16x16(__m512 values) { return (__m256i)_mm512_cvtneps_pbh(values); }
#else
static inline __m256i ps_to_bf16x16(__m512 values) {
    const __m512i bits = _mm512_castps_si512(values);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(rounded);
}
#endif

static inline __m512 round_bf16_ps(__m512 values) { return bf16x16_to_ps(ps_to_bf16x16(values)); }

#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* the 8 lanes' sum, in a fixed order */
static inline float sum_lanes_f32(__m256 v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
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
#endif
#endif
