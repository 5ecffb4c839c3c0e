/* The block routine of packed_gemm_bf16.c (see there for the weight layout), shared with the fused decode
 * step (decode_step_bf16.c): `packed_gemm_blocks` computes output blocks [first_block, last_block) for all
 * rows of x, each output summed in the same order wherever it runs, so both kernels give the same bits. */
#ifndef ELASTIC_PACKED_GEMM_BF16_H
#define ELASTIC_PACKED_GEMM_BF16_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "../../csrc/simd_exp.h"

#define ROWS 4

static inline void store16(void *y, int64_t offset, __m512 value, __mmask16 mask, int y_is_f32) {
    if (y_is_f32) _mm512_mask_storeu_ps((float *)y + offset, mask, value);
    else _mm256_mask_storeu_epi16((uint16_t *)y + offset, mask, ps_to_bf16x16(value));
}

/* Rows [i0, i0 + R) of one block of VEC x 16 outputs (an odd k's last input alone: its pair's partner is
 * zero). VEC and R are compile-time constants at each call, so the accumulators stay in registers
 * (R x VEC <= 16 of the 32 zmm) and the loops have no branches; x's pairs are broadcast straight from memory. */
static inline __attribute__((always_inline)) void block_rows(
        const uint16_t *x, int64_t ldx, const uint16_t *base, void *y, int64_t ldy, int y_is_f32,
        int64_t i0, int64_t first, int64_t valid, int64_t k, const int VEC, const int R) {
    const int64_t pairs = k / 2, stride = VEC * 32;  /* bf16 elements per input pair */
    __m512 acc[ROWS][4];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < VEC; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
        __m512bh w[4];
        for (int v = 0; v < VEC; ++v) w[v] = (__m512bh)_mm512_loadu_si512(base + p * stride + v * 32);
        for (int r = 0; r < R; ++r) {
            int32_t pair;  /* memcpy: no aliasing or alignment assumption; compiles to one broadcast load */
            memcpy(&pair, x + (i0 + r) * ldx + 2 * p, sizeof(pair));
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            for (int v = 0; v < VEC; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], w[v], xb);
        }
    }
    if (k % 2) {  /* the odd k's last input alone */
        __m512bh w[4];
        for (int v = 0; v < VEC; ++v) w[v] = (__m512bh)_mm512_loadu_si512(base + pairs * stride + v * 32);
        for (int r = 0; r < R; ++r) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int32_t)x[(i0 + r) * ldx + k - 1]);
            for (int v = 0; v < VEC; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], w[v], xb);
        }
    }
    for (int v = 0; v < VEC; ++v) {
        const int64_t left = valid - 16 * v;
        if (left <= 0) break;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        for (int r = 0; r < R; ++r) store16(y, (i0 + r) * ldy + first + 16 * v, acc[r][v], mask, y_is_f32);
    }
}

/* block_rows with VEC and the row count as constants (rows < ROWS only for a last, partial group). */
#define BLOCK_ROWS(VEC, R) block_rows(x, ldx, base, y, ldy, (int)y_is_f32, i0, first, valid, k, VEC, R)
static inline __attribute__((always_inline)) void row_group(
        const uint16_t *x, int64_t ldx, const uint16_t *base, void *y, int64_t ldy, int64_t y_is_f32,
        int64_t i0, int rows, int64_t first, int64_t valid, int64_t k, const int VEC) {
    switch (rows) {
        case 1: BLOCK_ROWS(VEC, 1); break;
        case 2: BLOCK_ROWS(VEC, 2); break;
        case 3: BLOCK_ROWS(VEC, 3); break;
        default: BLOCK_ROWS(VEC, ROWS); break;
    }
}

/* rows [0, m) x output blocks [first_block, last_block) of y = x w^T */
static inline void packed_gemm_blocks(const uint16_t *x, int64_t ldx, const uint16_t *w, void *y, int64_t ldy,
                                      int64_t y_is_f32, int64_t m, int64_t n, int64_t k, int64_t k_padded,
                                      int64_t block, int64_t first_block, int64_t last_block) {
    for (int64_t b = first_block; b < last_block; ++b) {
        const uint16_t *base = w + b * block * k_padded;
        const int64_t first = b * block;
        const int64_t valid = n - first < block ? n - first : block;
        for (int64_t i0 = 0; i0 < m; i0 += ROWS) {
            const int rows = m - i0 < ROWS ? (int)(m - i0) : ROWS;
            if (block == 64) row_group(x, ldx, base, y, ldy, y_is_f32, i0, rows, first, valid, k, 4);
            else row_group(x, ldx, base, y, ldy, y_is_f32, i0, rows, first, valid, k, 2);
        }
    }
}
#endif
