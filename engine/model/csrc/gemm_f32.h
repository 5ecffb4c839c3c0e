/* y[i, n] = sum_k x[i, k] * w[n, k] in fp32 on AVX2/FMA CPUs, with the weight packed in panels: 16 outputs
 * per panel, the panel's 16 weights of one input next to each other (wp[p][c][j] = w[16 p + j][c]; the last
 * panel padded with zero rows). Shared by the per-op kernel (gemm_f32.c) and the fused fp32 decode step
 * (decode_step_f32.c); engine/model/linear.py packs the weights at load.
 *
 * The register tile is an outer product: R x rows (up to 6) by one or two panels (16 or 32 outputs), 2 R or
 * 4 R accumulators of 8 lanes; per input, the panel's 16 weights are two loads and each x value one broadcast
 * (BLIS's 6x16 shape for 16 vector registers: 12 accumulators, 2 weights, 1 broadcast). 1-3 rows take two
 * panels at once, so that a decode row at batch 1 keeps four FMA chains going while it streams the weight.
 * Measured 2026-12-07 on a 2-vCPU Zen 3 EPYC (AVX2 only, peak ~167 GFLOP/s on both cores): 90-130 GFLOP/s at
 * 32-2048 rows, 1.2-1.6x the plain-weight dot-product tiles it replaced at 8-128 rows and about torch.mm's
 * (MKL's) speed from 512 rows on (`python -m loadtest.bench.gemm_f32`).
 *
 * The work is cut into units of GEMM_F32_UNIT_PANELS panels x GEMM_F32_ROWS x rows; inside a unit, x rows go
 * six at a time and each block of six meets every panel of the unit (the six rows stay in L1, the panels in
 * L2).
 *
 * Every y[i, n] is one FMA chain over k = 0, 1, ... from zero, whichever unit, thread or tile computes it, so
 * the result does not depend on the thread count or on m (a row's bits are the same in any batch). */
#ifndef GEMM_F32_H
#define GEMM_F32_H

#if !defined(__AVX2__) || !defined(__FMA__)
#error "gemm_f32 needs AVX2 and FMA (the engine falls back to torch.mm)"
#endif
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define GEMM_F32_PANEL 16   /* outputs per panel */
#ifndef GEMM_F32_UNIT_PANELS
#define GEMM_F32_UNIT_PANELS 4  /* panels per work unit */
#endif
#ifndef GEMM_F32_ROWS
#define GEMM_F32_ROWS 64    /* x rows per work unit */
#endif
#define GEMM_F32_UNIT (GEMM_F32_UNIT_PANELS * GEMM_F32_PANEL)  /* outputs per work unit */

static inline int64_t gemm_f32_panels(int64_t n) { return (n + GEMM_F32_PANEL - 1) / GEMM_F32_PANEL; }

/* one x row's FMAs for input c: row r of the tile against the P panels' weights w0..w3 */
#define GEMM_F32_ROW_FMAS(r)                                                         \
    if (R > r) {                                                                     \
        const __m256 b = _mm256_broadcast_ss(x + r * ldx + c);                       \
        a##r##0 = _mm256_fmadd_ps(b, w0, a##r##0);                                   \
        a##r##1 = _mm256_fmadd_ps(b, w1, a##r##1);                                   \
        if (P > 1) {                                                                 \
            a##r##2 = _mm256_fmadd_ps(b, w2, a##r##2);                               \
            a##r##3 = _mm256_fmadd_ps(b, w3, a##r##3);                               \
        }                                                                            \
    }
#define GEMM_F32_ROW_STORE(r)                                                        \
    if (R > r) {                                                                     \
        _mm256_storeu_ps(out + r * ldo, a##r##0);                                    \
        _mm256_storeu_ps(out + r * ldo + 8, a##r##1);                                \
        if (P > 1) {                                                                 \
            _mm256_storeu_ps(out + r * ldo + 16, a##r##2);                           \
            _mm256_storeu_ps(out + r * ldo + 24, a##r##3);                           \
        }                                                                            \
    }
#define GEMM_F32_ZERO4(r) \
    __m256 a##r##0 = _mm256_setzero_ps(), a##r##1 = a##r##0, a##r##2 = a##r##0, a##r##3 = a##r##0;

/* R x rows by P panels (R <= 6, P <= 2, R <= 3 where P == 2; constants once inlined): wp the first panel, the
 * next one k * 16 floats on; `cols` outputs of the 16 P are stored (fewer only for the weight's last panel).
 * Accumulators are named variables, not an array: GCC spills an array of vectors to the stack every step. */
static inline __attribute__((always_inline)) void gemm_f32_tile(const float *x, int64_t ldx, const float *wp,
                                                                 int64_t k, float *y, int64_t ldy, const int R,
                                                                 const int P, int64_t cols) {
    GEMM_F32_ZERO4(0) GEMM_F32_ZERO4(1) GEMM_F32_ZERO4(2) GEMM_F32_ZERO4(3) GEMM_F32_ZERO4(4) GEMM_F32_ZERO4(5)
    const float *wq = wp + k * GEMM_F32_PANEL;
    __m256 w2 = _mm256_setzero_ps(), w3 = w2;
    for (int64_t c = 0; c < k; ++c) {
        const __m256 w0 = _mm256_loadu_ps(wp + c * GEMM_F32_PANEL), w1 = _mm256_loadu_ps(wp + c * GEMM_F32_PANEL + 8);
        if (P > 1) {
            w2 = _mm256_loadu_ps(wq + c * GEMM_F32_PANEL);
            w3 = _mm256_loadu_ps(wq + c * GEMM_F32_PANEL + 8);
        }
        GEMM_F32_ROW_FMAS(0) GEMM_F32_ROW_FMAS(1) GEMM_F32_ROW_FMAS(2)
        GEMM_F32_ROW_FMAS(3) GEMM_F32_ROW_FMAS(4) GEMM_F32_ROW_FMAS(5)
    }
    float partial[6 * 2 * GEMM_F32_PANEL];
    const int whole = cols >= P * GEMM_F32_PANEL;
    float *out = whole ? y : partial;
    const int64_t ldo = whole ? ldy : P * GEMM_F32_PANEL;
    GEMM_F32_ROW_STORE(0) GEMM_F32_ROW_STORE(1) GEMM_F32_ROW_STORE(2)
    GEMM_F32_ROW_STORE(3) GEMM_F32_ROW_STORE(4) GEMM_F32_ROW_STORE(5)
    if (!whole)
        for (int r = 0; r < R; ++r) memcpy(y + r * ldy, partial + r * ldo, sizeof(float) * cols);
}

#define GEMM_F32_TILE_CASE(R, P) \
    case (R) * 4 + (P): gemm_f32_tile(x, ldx, wp, k, y, ldy, R, P, cols); return;

static inline void gemm_f32_tile_any(const float *x, int64_t ldx, const float *wp, int64_t k, float *y,
                                     int64_t ldy, int R, int P, int64_t cols) {
    switch (R * 4 + P) {
        GEMM_F32_TILE_CASE(6, 1) GEMM_F32_TILE_CASE(5, 1) GEMM_F32_TILE_CASE(4, 1)
        GEMM_F32_TILE_CASE(3, 2) GEMM_F32_TILE_CASE(2, 2) GEMM_F32_TILE_CASE(1, 2)
        GEMM_F32_TILE_CASE(3, 1) GEMM_F32_TILE_CASE(2, 1) GEMM_F32_TILE_CASE(1, 1)
        default: return;
    }
}

/* y rows [i0, i1), panels [p0, p1) of y = x @ w^T (n outputs, k inputs; x rows ldx apart, y rows ldy apart) */
static inline void gemm_f32_region(const float *x, int64_t ldx, const float *wp, float *y, int64_t ldy, int64_t n,
                                   int64_t k, int64_t p0, int64_t p1, int64_t i0, int64_t i1) {
    const int pair = i1 - i0 <= 3;  /* few rows: two panels a tile */
    for (int64_t i = i0; i < i1; i += 6) {
        const int R = i1 - i < 6 ? (int)(i1 - i) : 6;
        for (int64_t p = p0; p < p1;) {
            const int P = pair && p + 1 < p1 ? 2 : 1;
            const int64_t cols = n - p * GEMM_F32_PANEL;
            gemm_f32_tile_any(x + i * ldx, ldx, wp + p * k * GEMM_F32_PANEL, k, y + i * ldy + p * GEMM_F32_PANEL,
                              ldy, R, P, cols);
            p += P;
        }
    }
}

static inline int64_t gemm_f32_num_units(int64_t m, int64_t n) {
    const int64_t groups = (gemm_f32_panels(n) + GEMM_F32_UNIT_PANELS - 1) / GEMM_F32_UNIT_PANELS;
    return groups * ((m + GEMM_F32_ROWS - 1) / GEMM_F32_ROWS);
}

/* units [first, last) of y = x @ w^T, x [m, k], w [n, k] in panels. Units run panel-group-major within one
 * block of x rows, so the threads share that block while they stream the weight. */
static inline void gemm_f32_units(const float *x, int64_t ldx, const float *wp, float *y, int64_t ldy, int64_t m,
                                  int64_t n, int64_t k, int64_t first, int64_t last) {
    const int64_t panels = gemm_f32_panels(n);
    const int64_t groups = (panels + GEMM_F32_UNIT_PANELS - 1) / GEMM_F32_UNIT_PANELS;
    for (int64_t unit = first; unit < last; ++unit) {
        const int64_t p0 = (unit % groups) * GEMM_F32_UNIT_PANELS, i0 = (unit / groups) * GEMM_F32_ROWS;
        gemm_f32_region(x, ldx, wp, y, ldy, n, k, p0, p0 + GEMM_F32_UNIT_PANELS < panels ? p0 + GEMM_F32_UNIT_PANELS : panels,
                        i0, i0 + GEMM_F32_ROWS < m ? i0 + GEMM_F32_ROWS : m);
    }
}

#endif
