/* y[i, n] = sum_k x[i, k] * w[n, k] for a few rows of bf16 x (decode at small batch sizes), reading the
 * weight in the blocked layout oneDNN packs it into for AMX / AVX512-BF16 (engine/model/onednn_linear.py):
 *
 *   32 output rows per block, blocks one after another; inside a block, for each pair of inputs (2p, 2p+1)
 *   the 32 rows' two values side by side: w[n, 2p + j] at block(n / 32) + p * 64 + (n % 32) * 2 + j,
 *   with the input length padded to `k_padded` (a multiple of 32) by zeros.
 *
 * This is exactly vdpbf16ps' operand order: one 64-byte load holds 16 outputs' (2p, 2p+1) pairs, multiplied
 * by x's pair broadcast to every lane, so a block needs no horizontal sums. A decode-sized product only
 * streams the weight once (x stays in L1), and oneDNN's own kernels for a few rows read it at about half the
 * bandwidth this does (see `python -m engine.model.onednn_linear`). Rows of x are taken ROWS at a time; a
 * block (32 x k bf16, 36 KiB for k = 576) stays in L1/L2 across those passes. fp32 accumulation; y is
 * written as bf16 (rounded to nearest even) or fp32 (logits). The layout is checked at pack time, never
 * assumed: onednn_linear.py verifies it on every weight before using this kernel. */
#if !defined(__AVX512BF16__) || !defined(__AVX512F__)
#error "packed_gemm_bf16 needs AVX512-BF16 (the engine keeps oneDNN's kernels)"
#endif
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "../../csrc/simd_exp.h"

#define ROWS 4

static inline void store16(void *y, int64_t offset, __m512 value, __mmask16 mask, int y_is_f32) {
    if (y_is_f32) _mm512_mask_storeu_ps((float *)y + offset, mask, value);
    else _mm256_mask_storeu_epi16((uint16_t *)y + offset, mask, ps_to_bf16x16(value));
}

void packed_gemm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, void *y, int64_t ldy, int64_t y_is_f32,
                      int64_t m, int64_t n, int64_t k, int64_t k_padded, int64_t num_threads) {
    const int64_t num_blocks = (n + 31) / 32, pairs = k / 2;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < num_blocks; ++block) {
        const uint16_t *base = w + block * 32 * k_padded;
        const int64_t first = block * 32;
        const int64_t valid = n - first < 32 ? n - first : 32;
        const __mmask16 low = valid >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1u);
        const __mmask16 high = valid >= 32 ? (__mmask16)0xffff : valid <= 16 ? 0 : (__mmask16)((1u << (valid - 16)) - 1u);
        for (int64_t i0 = 0; i0 < m; i0 += ROWS) {
            const int rows = m - i0 < ROWS ? (int)(m - i0) : ROWS;
            __m512 acc[ROWS][2];
            for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
            for (int64_t p = 0; p < pairs; ++p) {
                const __m512bh w0 = (__m512bh)_mm512_loadu_si512(base + p * 64);
                const __m512bh w1 = (__m512bh)_mm512_loadu_si512(base + p * 64 + 32);
                for (int r = 0; r < rows; ++r) {
                    int32_t pair;
                    memcpy(&pair, x + (i0 + r) * ldx + 2 * p, sizeof(pair));
                    const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xb);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xb);
                }
            }
            if (k % 2) {  /* the last input alone: its pair's partner is zero */
                const __m512bh w0 = (__m512bh)_mm512_loadu_si512(base + pairs * 64);
                const __m512bh w1 = (__m512bh)_mm512_loadu_si512(base + pairs * 64 + 32);
                for (int r = 0; r < rows; ++r) {
                    const __m512bh xb = (__m512bh)_mm512_set1_epi32((int32_t)x[(i0 + r) * ldx + k - 1]);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xb);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xb);
                }
            }
            for (int r = 0; r < rows; ++r) {
                store16(y, (i0 + r) * ldy + first, acc[r][0], low, (int)y_is_f32);
                if (high) store16(y, (i0 + r) * ldy + first + 16, acc[r][1], high, (int)y_is_f32);
            }
        }
    }
}
