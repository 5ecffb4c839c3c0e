/* y[i, n] = sum_k x[i, k] * w[n, k]: fp32 products with a plain row-major weight [n, k] (the model's own
 * layout, nothing repacked), AVX2/FMA. Shared by the per-op kernel (gemm_f32.c) and the fused fp32 decode step
 * (decode_step_f32.c).
 *
 * The product is cut into work units of GEMM_F32_UNIT weight rows x GEMM_F32_ROWS x rows. Inside a unit, x
 * rows go GEMM_F32_TR at a time and weight rows GEMM_F32_TW at a time: a register tile of TW x TR dot products,
 * each an AVX2 accumulator of 8 lanes, over the whole k; 2 x 6 measured best of 3x4, 3x3, 2x4, 2x5, 2x6, 4x2
 * and 4x3 at 16-64 rows on a Zen 3 EPYC (2026-12-07; -DGEMM_F32_TW / -DGEMM_F32_TR build the others). The lanes
 * are summed at the end in a fixed order, then the k % 8 tail in order. At one row this streams each weight row
 * once, at the memory's pace (decode at batch 1); from a few rows on it is bound by the FMAs (~100 GFLOP/s on
 * two Zen 3 cores at 64 rows, about oneDNN's speed on a packed weight).
 *
 * Every y[i, n] is computed by the same sequence of operations whichever unit, thread or tile shape computes
 * it (lane sums in a fixed order), so the result does not depend on the thread count or on m. */
#ifndef GEMM_F32_H
#define GEMM_F32_H

#if !defined(__AVX2__) || !defined(__FMA__)
#error "gemm_f32 needs AVX2 and FMA (the engine falls back to torch.mm)"
#endif
#include <immintrin.h>
#include <stdint.h>

#ifndef GEMM_F32_TW
#define GEMM_F32_TW 2      /* weight rows per register tile */
#endif
#ifndef GEMM_F32_TR
#define GEMM_F32_TR 6      /* x rows per register tile */
#endif
#define GEMM_F32_UNIT 24   /* weight rows per work unit */
#define GEMM_F32_ROWS 64   /* x rows per work unit */

static inline float gemm_f32_lanes(__m256 v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

/* W weight rows x R x rows (W <= GEMM_F32_TW, R <= GEMM_F32_TR, both constants once inlined) */
static inline __attribute__((always_inline)) void gemm_f32_tile(const float *x, int64_t ldx, const float *w,
                                                                 int64_t k, float *y, int64_t ldy, const int W,
                                                                 const int R) {
    if (W > GEMM_F32_TW || R > GEMM_F32_TR) return;  /* not a tile of this build (folded away) */
    __m256 acc[GEMM_F32_TW][GEMM_F32_TR];
    for (int a = 0; a < W; ++a)
        for (int r = 0; r < R; ++r) acc[a][r] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) {
        __m256 wv[GEMM_F32_TW], xv[GEMM_F32_TR];
        for (int a = 0; a < W; ++a) wv[a] = _mm256_loadu_ps(w + a * k + c);
        for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * ldx + c);
        for (int r = 0; r < R; ++r)
            for (int a = 0; a < W; ++a) acc[a][r] = _mm256_fmadd_ps(wv[a], xv[r], acc[a][r]);
    }
    for (int r = 0; r < R; ++r)
        for (int a = 0; a < W; ++a) {
            float sum = gemm_f32_lanes(acc[a][r]);
            for (int64_t t = c; t < k; ++t) sum += x[r * ldx + t] * w[a * k + t];
            y[r * ldy + a] = sum;
        }
}

#define GEMM_F32_TILE_CASE(W, R) \
    case (W) * 8 + (R): gemm_f32_tile(x, ldx, w, k, y, ldy, W, R); return;

static inline void gemm_f32_tile_any(const float *x, int64_t ldx, const float *w, int64_t k, float *y, int64_t ldy,
                              int W, int R) {
    switch (W * 8 + R) {
        GEMM_F32_TILE_CASE(4, 4) GEMM_F32_TILE_CASE(4, 3) GEMM_F32_TILE_CASE(4, 2) GEMM_F32_TILE_CASE(4, 1)
        GEMM_F32_TILE_CASE(3, 4) GEMM_F32_TILE_CASE(3, 3) GEMM_F32_TILE_CASE(3, 2) GEMM_F32_TILE_CASE(3, 1)
        GEMM_F32_TILE_CASE(2, 6) GEMM_F32_TILE_CASE(2, 5) GEMM_F32_TILE_CASE(1, 6) GEMM_F32_TILE_CASE(1, 5)
        GEMM_F32_TILE_CASE(2, 4) GEMM_F32_TILE_CASE(2, 3) GEMM_F32_TILE_CASE(2, 2) GEMM_F32_TILE_CASE(2, 1)
        GEMM_F32_TILE_CASE(1, 4) GEMM_F32_TILE_CASE(1, 3) GEMM_F32_TILE_CASE(1, 2) GEMM_F32_TILE_CASE(1, 1)
        default: return;
    }
}

/* y rows [i0, i1), columns [n0, n1) of y = x @ w^T (x rows ldx apart, y rows ldy apart, k inputs) */
static inline void gemm_f32_region(const float *x, int64_t ldx, const float *w, float *y, int64_t ldy, int64_t k,
                            int64_t n0, int64_t n1, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += GEMM_F32_TR) {
        const int R = i1 - i < GEMM_F32_TR ? (int)(i1 - i) : GEMM_F32_TR;
        for (int64_t j = n0; j < n1; j += GEMM_F32_TW) {
            const int W = n1 - j < GEMM_F32_TW ? (int)(n1 - j) : GEMM_F32_TW;
            gemm_f32_tile_any(x + i * ldx, ldx, w + j * k, k, y + i * ldy + j, ldy, W, R);
        }
    }
}

static inline int64_t gemm_f32_num_units(int64_t m, int64_t n) {
    return ((n + GEMM_F32_UNIT - 1) / GEMM_F32_UNIT) * ((m + GEMM_F32_ROWS - 1) / GEMM_F32_ROWS);
}

/* units [first, last) of y = x @ w^T, x [m, k], w [n, k]. Units run weight-block-major within one block of x
 * rows, so the threads share that block in L2 while they stream the weight. */
static inline void gemm_f32_units(const float *x, int64_t ldx, const float *w, float *y, int64_t ldy, int64_t m,
                           int64_t n, int64_t k, int64_t first, int64_t last) {
    const int64_t blocks = (n + GEMM_F32_UNIT - 1) / GEMM_F32_UNIT;
    for (int64_t unit = first; unit < last; ++unit) {
        const int64_t n0 = (unit % blocks) * GEMM_F32_UNIT, i0 = (unit / blocks) * GEMM_F32_ROWS;
        gemm_f32_region(x, ldx, w, y, ldy, k, n0, n0 + GEMM_F32_UNIT < n ? n0 + GEMM_F32_UNIT : n, i0,
                        i0 + GEMM_F32_ROWS < m ? i0 + GEMM_F32_ROWS : m);
    }
}

#endif
