/* y = x @ w^T in fp32 with the weight packed in panels (csrc/gemm_f32.h), as one parallel region whose threads
 * claim work units as they get to them (a thread that loses its core to another process leaves its units to
 * its partner instead of holding it at the join). x rows ldx apart, y rows ldy apart. */
#include "gemm_f32.h"

void gemm_f32(const float *x, int64_t ldx, const float *panels, float *y, int64_t ldy, int64_t m, int64_t n,
              int64_t k, int64_t num_threads) {
    const int64_t units = gemm_f32_num_units(m, n);
    #pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t unit = 0; unit < units; ++unit) gemm_f32_units(x, ldx, panels, y, ldy, m, n, k, unit, unit + 1);
}
