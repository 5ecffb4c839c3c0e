/* y[i, n] = sum_k x[i, k] * w[n, k] for a few rows of bf16 x (decode at small batch sizes), reading the
 * weight in the blocked layout oneDNN packs it into for AMX / AVX512-BF16 (engine/model/onednn_linear.py):
 *
 *   B output rows per block (B = 32 or 64: oneDNN picks by CPU), blocks one after another; inside a block,
 *   for each pair of inputs (2p, 2p+1) the B rows' two values side by side:
 *   w[n, 2p + j] at block(n / B) + p * 2B + (n % B) * 2 + j, with the input length padded to `k_padded` by zeros.
 *
 * This is exactly vdpbf16ps' operand order: one 64-byte load holds 16 outputs' (2p, 2p+1) pairs, multiplied
 * by x's pair broadcast to every lane, so a block needs no horizontal sums. A decode-sized product only
 * streams the weight once (x stays in L1), and oneDNN's own kernels for a few rows read it at about half the
 * bandwidth this does (see `python -m engine.model.onednn_linear`). Rows of x are taken ROWS at a time; a
 * block (B x k bf16, 36-72 KiB for k = 576) stays in L1/L2 across those passes. The products are fp32 FMAs
 * that give vdpbf16ps' bits (packed_gemm_bf16.h). fp32 accumulation; y is
 * written as bf16 (rounded to nearest even) or fp32 (logits). The layout is checked at pack time, never
 * assumed: onednn_linear.py verifies it on every weight before using this kernel. */
#define _GNU_SOURCE  /* clock_gettime, syscall */
#if !defined(__AVX512BF16__) || !defined(__AVX512F__)
#error "packed_gemm_bf16 needs AVX512-BF16 (the engine keeps oneDNN's kernels)"
#endif
#include <stdlib.h>
#include <time.h>

#include "elementwise_bf16.h"
#include "packed_gemm_bf16.h"

/* the copy of x's m rows of k inputs the units read (packed_gemm_x), or NULL when out of memory */
static float *alloc_x32(int64_t m, int64_t k) {
    return (float *)malloc(sizeof(float) * (size_t)(packed_gemm_x_rows(m) * f32_row_length(k)));
}

/* fills x32 with the calling parallel region's threads, rows split evenly (an orphaned `omp for`) */
static void team_convert_x(const uint16_t *x, int64_t ldx, int64_t m, int64_t k, float *x32) {
    const int64_t ld32 = f32_row_length(k);
    const int pairs = packed_gemm_x_pairs(m, k);
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < m; ++r) packed_gemm_x(x + r * ldx, ldx, 1, k, x32 + r * ld32, pairs);
}

/* Returns 0, or -1 when the copy of x could not be allocated (nothing written). */
int64_t packed_gemm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, void *y, int64_t ldy, int64_t y_is_f32,
                         int64_t m, int64_t n, int64_t k, int64_t k_padded, int64_t block, int64_t num_threads) {
    const int64_t units = packed_gemm_num_units(m, n, k, block);
    float *x32 = alloc_x32(m, k);
    if (x32 == NULL) return -1;
    #pragma omp parallel num_threads(num_threads)
    {
        team_convert_x(x, ldx, m, k, x32);
        /* units two at a time as threads get to them: a thread that loses its core to another process leaves
         * its partner the rest instead of making it wait at the join (the bits do not depend on the thread) */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u += 2)  /* a pair: both 32-output slices of a block in one pass (sliced) */
            packed_gemm_units(x32, w, y, ldy, y_is_f32, m, n, k, k_padded, block, u, u + 2 < units ? u + 2 : units);
    }
    free(x32);
    return 0;
}

/* act = SiLU(gate) x up of gate_up = x w^T, w holding the `inter` gate outputs then the `inter` up outputs (an
 * MLP's fused gate_up weight), in one parallel region: each claim takes a gate unit and the up unit over the
 * same columns and rows (the first and second halves of the units line up when inter % block == 0) and applies
 * SiLU x up to that region while it is in cache. gate_up is still written (the caller's scratch), and every
 * value is computed by the same routines in the same order as packed_gemm_bf16 then silu_mul_bf16: same bits.
 * Saves the separate SiLU x up pass over gate_up (re-read from memory at prefill sizes) and its fork/join.
 * Returns 0, -1 when the copy of x could not be allocated, -2 when inter is not a multiple of block. */
int64_t packed_gemm_silu_mul_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, uint16_t *gate_up, uint16_t *act,
                                  int64_t m, int64_t inter, int64_t k, int64_t k_padded, int64_t block,
                                  int64_t num_threads) {
    const int64_t n = 2 * inter, half = packed_gemm_num_units(m, n, k, block) / 2;
    if (inter % block) return -2;
    float *x32 = alloc_x32(m, k);
    if (x32 == NULL) return -1;
    #pragma omp parallel num_threads(num_threads)
    {
        team_convert_x(x, ldx, m, k, x32);
        /* two units of each half at a time, as threads get to them (packed_gemm_bf16's granularity) */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t first = 0; first < half; first += 2) {
            const int64_t last = first + 2 < half ? first + 2 : half;
            packed_gemm_units(x32, w, gate_up, n, 0, m, n, k, k_padded, block, first, last);
            packed_gemm_units(x32, w, gate_up, n, 0, m, n, k, k_padded, block, first + half, last + half);
            for (int64_t u = first; u < last; ++u) {
                int64_t col0, col1, row0, row1;
                packed_gemm_unit_region(u, m, n, k, block, &col0, &col1, &row0, &row1);
                for (int64_t row = row0; row < row1; ++row)
                    silu_mul_columns(gate_up + row * n, gate_up + row * n + inter, act + row * inter, col0, col1);
            }
        }
    }
    free(x32);
    return 0;
}

/* The best of `repeats` single-thread times in ns of one product with each routine (64 rows, 512 x 576, in
 * 64-output blocks), alternating: times[0] the FMAs', times[1] vdpbf16ps'. Leaves the routine as it was.
 * Returns -1 when out of memory. The engine picks the faster routine with it (onednn_linear.bf16_dot). */
int64_t packed_gemm_time_dots(int64_t repeats, int64_t *times) {
    const int64_t m = 64, n = 512, k = 576, ld32 = f32_row_length(k);
    const int saved = packed_gemm_dpbf16;
    const int64_t saved_amx = packed_gemm_amx_rows;
    packed_gemm_amx_rows = 0;  /* the two routines, not the tiles */
    uint16_t *w = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n * k)), *x = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(m * k));
    float *x32 = (float *)malloc(sizeof(float) * (size_t)(m * ld32)), *y = (float *)malloc(sizeof(float) * (size_t)(m * n));
    if (!w || !x || !x32 || !y) {
        free(w), free(x), free(x32), free(y);
        return -1;
    }
    for (int64_t i = 0; i < n * k; ++i) w[i] = (uint16_t)(0x3c00u + (uint16_t)(i * 7919 % 0x7f));  /* ~1.x values */
    for (int64_t i = 0; i < m * k; ++i) x[i] = (uint16_t)(0x3c00u + (uint16_t)(i * 104729 % 0x7f));
    times[0] = times[1] = INT64_MAX;
    for (int64_t rep = 0; rep < 2 * repeats; ++rep) {
        const int dot = (int)(rep & 1);
        struct timespec t0, t1;
        packed_gemm_dpbf16 = dot;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        packed_gemm_x(x, k, m, k, x32, packed_gemm_x_pairs(m, k));
        packed_gemm_units(x32, w, y, n, 1, m, n, k, k, 64, 0, packed_gemm_num_units(m, n, k, 64));
        clock_gettime(CLOCK_MONOTONIC, &t1);
        const int64_t ns = (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
        times[dot] = ns < times[dot] ? ns : times[dot];
    }
    packed_gemm_dpbf16 = saved;
    packed_gemm_amx_rows = saved_amx;
    free(w), free(x), free(x32), free(y);
    return 0;
}
