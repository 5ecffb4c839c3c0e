/* The bf16 decoder's elementwise ops, each one pass in C instead of 3-7 torch ops (each a dispatch and a
 * pass over memory): residual add + RMSNorm, RoPE on q and k in place, SiLU(gate) * up.
 *
 * Every op rounds to bf16 where the torch ops it replaces round (after each torch op), so it computes what
 * engine/model/elementwise.py's torch version computes, up to the order of the fp32 sum in RMSNorm.
 * Plain C with -march=native: gcc vectorises the loops for whatever the CPU has (AVX2 or AVX-512).
 */
#include "elementwise_bf16.h"

void add_rms_norm_bf16(uint16_t *hidden, const uint16_t *delta, const uint16_t *weight, uint16_t *out,
                       int64_t num_rows, int64_t width, int64_t hidden_stride, int64_t out_stride, float eps,
                       int64_t num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (num_rows >= 8)
    for (int64_t r = 0; r < num_rows; ++r)
        add_rms_norm_row(hidden + r * hidden_stride, delta == NULL ? NULL : delta + r * width, weight,
                         out + r * out_stride, width, eps);
}

/* x[t, h, :] <- x * cos[t] + rotate_half(x) * sin[t] in place, for q's and k's heads of each token.
 * x rows are `row_stride` apart (the fused qkv buffer); cos/sin rows `table_stride` apart. */
void rope_bf16(uint16_t *x, int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t row_stride,
               const uint16_t *cos, const uint16_t *sin, int64_t table_stride, int64_t num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (num_tokens >= 8)
    for (int64_t t = 0; t < num_tokens; ++t)
        for (int64_t h = 0; h < num_heads; ++h)
            rope_head(x + t * row_stride + h * head_dim, cos + t * table_stride, sin + t * table_stride, head_dim / 2);
}

/* out[t, j] = silu(gate_up[t, j]) * gate_up[t, width + j] */
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t num_rows, int64_t width, int64_t num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (num_rows >= 4)
    for (int64_t r = 0; r < num_rows; ++r)
        silu_mul_columns(gate_up + r * 2 * width, gate_up + r * 2 * width + width, out + r * width, 0, width);
}
