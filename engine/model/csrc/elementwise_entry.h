/* The per-op elementwise entry points over a dtype's row routines (add_rms_norm_row, rope_head,
 * silu_mul_columns of elementwise_bf16.h or elementwise_f32.h), one OpenMP loop over rows each:
 * ELEMENTWISE_ENTRY_POINTS(bf16, uint16_t) defines add_rms_norm_bf16, rope_bf16 and silu_mul_bf16. */
#ifndef ELEMENTWISE_ENTRY_H
#define ELEMENTWISE_ENTRY_H

#include <stdint.h>

#define ELEMENTWISE_ENTRY_POINTS(SUFFIX, T)                                                                   \
/* hidden rows `hidden_stride` apart (+= delta, rows `width` apart, when not NULL), out rows `out_stride` */  \
void add_rms_norm_##SUFFIX(T *hidden, const T *delta, const T *weight, T *out, int64_t num_rows, int64_t width, \
                           int64_t hidden_stride, int64_t out_stride, float eps, int64_t num_threads) {          \
    _Pragma("omp parallel for num_threads(num_threads) schedule(static) if (num_rows >= 8)")                     \
    for (int64_t r = 0; r < num_rows; ++r)                                                                       \
        add_rms_norm_row(hidden + r * hidden_stride, delta == NULL ? NULL : delta + r * width, weight,           \
                         out + r * out_stride, width, eps);                                                      \
}                                                                                                                \
/* x[t, h, :] <- x * cos[t] + rotate_half(x) * sin[t] in place, for q's and k's heads of each token; x rows   \
 * `row_stride` apart (the fused qkv buffer), cos/sin rows `table_stride` apart */                             \
void rope_##SUFFIX(T *x, int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t row_stride,           \
                   const T *cos, const T *sin, int64_t table_stride, int64_t num_threads) {                      \
    _Pragma("omp parallel for num_threads(num_threads) schedule(static) if (num_tokens >= 8)")                   \
    for (int64_t t = 0; t < num_tokens; ++t)                                                                     \
        for (int64_t h = 0; h < num_heads; ++h)                                                                  \
            rope_head(x + t * row_stride + h * head_dim, cos + t * table_stride, sin + t * table_stride,         \
                      head_dim / 2);                                                                             \
}                                                                                                                \
/* out[t, j] = silu(gate_up[t, j]) * gate_up[t, width + j] */                                                  \
void silu_mul_##SUFFIX(const T *gate_up, T *out, int64_t num_rows, int64_t width, int64_t num_threads) {         \
    _Pragma("omp parallel for num_threads(num_threads) schedule(static) if (num_rows >= 4)")                     \
    for (int64_t r = 0; r < num_rows; ++r)                                                                       \
        silu_mul_columns(gate_up + r * 2 * width, gate_up + r * 2 * width + width, out + r * width, 0, width);   \
}

#endif
