/* y[i, n] = sum_k x[i, k] * w[n, k] for a few rows of x (decode at small batch sizes).

   Such a product is bound by reading the weight from memory, and BLAS libraries tuned for big matrices
   read it at about half the machine's bandwidth there (and repack it per call). Here each thread streams
   its share of w's rows exactly once, 4 rows at a time, with x (a few KiB) staying in L1; per row the 8
   lanes of an AVX2 accumulator are summed at the end. fp32, w row-major [n, k], y rows `ldy` apart. */
#if !defined(__AVX2__) || !defined(__FMA__)
#error "skinny_gemm needs AVX2 and FMA (the engine falls back to torch.mm)"
#endif
#include <immintrin.h>
#include <stdint.h>

#define ROWS 4

static inline float horizontal_sum(__m256 v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_hadd_ps(sum, sum);
    sum = _mm_hadd_ps(sum, sum);
    return _mm_cvtss_f32(sum);
}

void skinny_gemm_f32(const float *x, const float *w, float *y, int64_t m, int64_t n, int64_t k, int64_t ldy,
                     int64_t num_threads) {
    int64_t num_blocks = (n + ROWS - 1) / ROWS;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < num_blocks; ++block) {
        int64_t first = block * ROWS;
        int rows = n - first < ROWS ? (int)(n - first) : ROWS;
        for (int64_t i = 0; i < m; ++i) {
            const float *xi = x + i * k;
            __m256 acc[ROWS];
            for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
            int64_t c = 0;
            for (; c + 8 <= k; c += 8) {
                __m256 xv = _mm256_loadu_ps(xi + c);
                for (int r = 0; r < rows; ++r)
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + (first + r) * k + c), xv, acc[r]);
            }
            for (int r = 0; r < rows; ++r) {
                const float *wr = w + (first + r) * k;
                float sum = horizontal_sum(acc[r]);
                for (int64_t t = c; t < k; ++t) sum += xi[t] * wr[t];
                y[i * ldy + first + r] = sum;
            }
        }
    }
}
