/* The block routine of packed_gemm_bf16.c (see there for the weight layout), shared with the fused decode
 * step (decode_step_bf16.c): `packed_gemm_units` computes work units [first_unit, last_unit) of y = x w^T
 * (a unit: one block of outputs for up to UNIT_ROWS rows), each output summed in the same order wherever it
 * runs, so both kernels give the same bits.
 *
 * The products run as fp32 FMAs on the weight's bf16 pairs split into fp32 (the odd input's value: the pair
 * & 0xffff0000; the even one's: the pair << 16), odd first, then even, with DAZ and FTZ set: exactly what
 * vdpbf16ps computes (Intel's definition; checked bit for bit on millions of random and denormal-heavy
 * operands), at about 1.5x its throughput here (vdpbf16ps issues about once a cycle, FMAs twice): 3072x576 at
 * 64 rows 130 vs 82 GFLOP/s on one core of the AVX512-BF16 Xeon without AMX, and never slower at 1-2 rows,
 * where both stream the weight. On AMD's Zen 4 it is the other way round (vdpbf16ps does 32 pairs a cycle, an
 * FMA 16 values): 3072x576 at 64 rows 223 (vdpbf16ps) vs 115 GFLOP/s (FMAs) on one core of the 2-vCPU EPYC,
 * same bits. So both routines are here and `packed_gemm_set_dot` picks one per library (the engine times them
 * once per process: engine/model/onednn_linear.py `bf16_dot`). x is prepared once per call (packed_gemm_x):
 * converted to fp32 for the FMAs, copied as bf16 pairs for vdpbf16ps. */
#ifndef ELASTIC_PACKED_GEMM_BF16_H
#define ELASTIC_PACKED_GEMM_BF16_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "../../csrc/simd_exp.h"

#define ROWS 4        /* rows per register tile: 4 rows x 64 outputs = 16 accumulators */
#define UNIT_ROWS 16  /* rows per work unit: products of more rows split by rows too, so threads balance */

static inline void store16(void *y, int64_t offset, __m512 value, __mmask16 mask, int y_is_f32) {
    if (y_is_f32) _mm512_mask_storeu_ps((float *)y + offset, mask, value);
    else _mm256_mask_storeu_epi16((uint16_t *)y + offset, mask, ps_to_bf16x16(value));
}

/* the fp32 row length bf16_rows_to_f32 writes for k inputs: k rounded up to a pair */
static inline int64_t f32_row_length(int64_t k) { return k + (k & 1); }

/* x32[r, :] = x[r, :k] in fp32 (exact), an odd k padded with one zero */
static inline void bf16_rows_to_f32(const uint16_t *x, int64_t ldx, int64_t m, int64_t k, float *x32) {
    const int64_t ld32 = f32_row_length(k);
    for (int64_t r = 0; r < m; ++r) {
        int64_t i = 0;
        for (; i + 16 <= k; i += 16)
            _mm512_storeu_ps(x32 + r * ld32 + i, bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(x + r * ldx + i))));
        for (; i < ld32; ++i) {
            const uint32_t bits = i < k ? ((uint32_t)x[r * ldx + i]) << 16 : 0u;
            memcpy(x32 + r * ld32 + i, &bits, sizeof(bits));
        }
    }
}

/* 1: the products run as vdpbf16ps, 0: as fp32 FMAs (the same bits either way). Set once, before any product
 * (packed_gemm_set_dot: each library including this header has its own). */
static int packed_gemm_dpbf16 = 0;

int64_t packed_gemm_set_dot(int64_t use_dpbf16) {
    packed_gemm_dpbf16 = use_dpbf16 != 0;
    return packed_gemm_dpbf16;
}

/* 0 (off) or the fewest rows a product runs on AMX tiles with (packed_gemm_set_amx). Each
 * library including this header has its own, as packed_gemm_dpbf16. */
static int64_t packed_gemm_amx_rows = 0;

/* Whether a product of m rows of k inputs runs on AMX tiles: k a whole number of tile rows (32 inputs). */
static inline int packed_gemm_on_amx(int64_t m, int64_t k) {
    return packed_gemm_amx_rows > 0 && m >= packed_gemm_amx_rows && k % 32 == 0;
}

/* Whether x's copy for a product of m rows of k inputs holds bf16 pairs (vdpbf16ps, AMX) or fp32 (FMAs). */
static inline int packed_gemm_x_pairs(int64_t m, int64_t k) { return packed_gemm_dpbf16 || packed_gemm_on_amx(m, k); }

/* The rows to allocate for x's copy of a product of m rows: AMX tiles read 16 rows at a time (rows past m
 * only feed outputs that are never stored). */
static inline int64_t packed_gemm_x_rows(int64_t m) { return (m + 15) / 16 * 16; }

/* x's m rows of k inputs as the products read them, in a buffer of packed_gemm_x_rows(total rows) *
 * f32_row_length(k) floats: fp32 values (FMAs) or, with `pairs` (packed_gemm_x_pairs of the whole product),
 * the bf16 pairs (x[2p], x[2p + 1]) as one 32-bit word each at the start of each row (an odd k's last pair
 * (x[k - 1], 0)) */
static inline void packed_gemm_x(const uint16_t *x, int64_t ldx, int64_t m, int64_t k, float *x32, int pairs) {
    if (!pairs) {
        bf16_rows_to_f32(x, ldx, m, k, x32);
        return;
    }
    const int64_t ld32 = f32_row_length(k);
    for (int64_t r = 0; r < m; ++r) {
        uint16_t *row = (uint16_t *)(x32 + r * ld32);
        memcpy(row, x + r * ldx, sizeof(uint16_t) * (size_t)k);
        if (k & 1) row[k] = 0;
    }
}

/* Rows [i0, i0 + R) of one block of VEC x 16 outputs. VEC and R are compile-time constants at each call, so
 * the R x VEC accumulators stay in registers and the loops have no branches; x's values are broadcast
 * straight from memory. An odd k's last pair is (x[k - 1], 0) against the weight's zero padding, as
 * vdpbf16ps took it. DP (a constant too): the products as vdpbf16ps on x's pairs (packed_gemm_x). */
static inline __attribute__((always_inline)) void block_rows(
        const float *x32, int64_t ld32, const uint16_t *base, int64_t stride, void *y, int64_t ldy, int y_is_f32,
        int64_t i0, int64_t first, int64_t valid, const int VEC, const int R, const int DP) {
    const int64_t pairs = ld32 / 2;  /* stride: bf16 elements per input pair in the block (2 x its outputs) */
    const __m512i odd_half = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[ROWS][4];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < VEC; ++v) acc[r][v] = _mm512_setzero_ps();
    if (DP) {
        for (int64_t p = 0; p < pairs; ++p)
            for (int v = 0; v < VEC; ++v) {
                const __m512bh w = (__m512bh)_mm512_loadu_si512(base + p * stride + v * 32);
                for (int r = 0; r < R; ++r) {
                    const uint32_t *xr = (const uint32_t *)(x32 + (i0 + r) * ld32);
                    acc[r][v] = _mm512_dpbf16_ps(acc[r][v], w, (__m512bh)_mm512_set1_epi32((int)xr[p]));
                }
            }
    } else for (int64_t p = 0; p < pairs; ++p) {
        for (int v = 0; v < VEC; ++v) {
            const __m512i w = _mm512_loadu_si512(base + p * stride + v * 32);
            const __m512 w_odd = _mm512_castsi512_ps(_mm512_and_si512(w, odd_half));
            const __m512 w_even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
            for (int r = 0; r < R; ++r) {
                const float *xr = x32 + (i0 + r) * ld32 + 2 * p;
                acc[r][v] = _mm512_fmadd_ps(w_odd, _mm512_set1_ps(xr[1]), acc[r][v]);
                acc[r][v] = _mm512_fmadd_ps(w_even, _mm512_set1_ps(xr[0]), acc[r][v]);
            }
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
#define BLOCK_ROWS(VEC, R) block_rows(x32, ld32, base, stride, y, ldy, (int)y_is_f32, i0, first, valid, VEC, R, DP)
static inline __attribute__((always_inline)) void row_group(
        const float *x32, int64_t ld32, const uint16_t *base, int64_t stride, void *y, int64_t ldy, int64_t y_is_f32,
        int64_t i0, int rows, int64_t first, int64_t valid, const int VEC, const int DP) {
    switch (rows) {
        case 1: BLOCK_ROWS(VEC, 1); break;
        case 2: BLOCK_ROWS(VEC, 2); break;
        case 3: BLOCK_ROWS(VEC, 3); break;
        default: BLOCK_ROWS(VEC, ROWS); break;
    }
}

/* Products of at most SLICE_ROWS rows only stream the weight: their units are 32-output slices (half a
 * 64-output block), so that two threads can split SmolLM2's 576 outputs (nine 64-blocks) evenly; a thread
 * given both slices of a block (callers hand out units in pairs) reads the block once, front to back, for
 * both (measured: a batch-1 decode step 15.5-16.0 -> 9.9-10.0 ms on a 2-vCPU Zen 4). Beyond, a unit's whole
 * block keeps 16 accumulators busy. */
#define SLICE_ROWS 4

/* Whether a product of m rows of k inputs is split into 32-output slices for every row (few rows, off the
 * tiles), rather than into (output block, UNIT_ROWS rows) units. */
static inline int packed_gemm_sliced(int64_t m, int64_t k) { return m <= SLICE_ROWS && !packed_gemm_on_amx(m, k); }

/* how many work units a product of m rows of k inputs and n outputs in blocks of `block` has */
static inline int64_t packed_gemm_num_units(int64_t m, int64_t n, int64_t k, int64_t block) {
    const int64_t blocks = (n + block - 1) / block;
    return packed_gemm_sliced(m, k) ? blocks * (block / 32) : blocks * ((m + UNIT_ROWS - 1) / UNIT_ROWS);
}

/* the outputs [*col0, *col1) and rows [*row0, *row1) unit u of packed_gemm_units computes */
static inline void packed_gemm_unit_region(int64_t u, int64_t m, int64_t n, int64_t k, int64_t block, int64_t *col0,
                                           int64_t *col1, int64_t *row0, int64_t *row1) {
    if (packed_gemm_sliced(m, k)) {
        *col0 = 32 * u;
        *col1 = *col0 + 32;
        *row0 = 0;
        *row1 = m;
    } else {
        const int64_t row_chunks = (m + UNIT_ROWS - 1) / UNIT_ROWS;
        *col0 = u / row_chunks * block;
        *col1 = *col0 + block;
        *row0 = u % row_chunks * UNIT_ROWS;
        *row1 = *row0 + UNIT_ROWS;
    }
    *col1 = *col1 < n ? *col1 : n;
    *row1 = *row1 < m ? *row1 : m;
}

/* units [first_unit, last_unit) of y = x w^T, x given as x32 (packed_gemm_x of x's m rows of k inputs).
 * Up to SLICE_ROWS rows, unit u is the 32-output slice u of the outputs, for every row; beyond, unit u is
 * output block u / row_chunks, rows [UNIT_ROWS * (u % row_chunks), ... + UNIT_ROWS) (consecutive units share a
 * block, so a thread's share reads each block once). Any split sums each output in the same order. */
static inline __attribute__((always_inline)) void packed_gemm_units_dot(
        const float *x32, const uint16_t *w, void *y, int64_t ldy, int64_t y_is_f32, int64_t m, int64_t n, int64_t k,
        int64_t k_padded, int64_t block, int64_t first_unit, int64_t last_unit, const int DP) {
    const int64_t ld32 = f32_row_length(k), row_chunks = (m + UNIT_ROWS - 1) / UNIT_ROWS;
    const unsigned int mxcsr = _mm_getcsr();
    _mm_setcsr(mxcsr | 0x8040u);  /* FTZ | DAZ, as vdpbf16ps: denormal inputs read 0, denormal sums flush */
    if (packed_gemm_sliced(m, k)) {
        const int64_t per_block = block / 32;
        for (int64_t u = first_unit; u < last_unit; ++u) {
            const int64_t b = u / per_block, slice = u % per_block, first = b * block + 32 * slice;
            const int64_t valid = n - first < 32 ? n - first : 32;
            if (valid <= 0) continue;
            if (per_block == 2 && slice == 0 && u + 1 < last_unit) {
                /* both slices of a 64-output block in one pass: its weight read front to back (one slice at a
                 * time read every other half of it, twice); each output sums over the same pairs in the same
                 * order, so the bits do not change */
                const int64_t both = n - first < 64 ? n - first : 64;
                row_group(x32, ld32, w + b * block * k_padded, 2 * block, y, ldy, y_is_f32, 0, (int)m, first, both, 4, DP);
                ++u;
                continue;
            }
            row_group(x32, ld32, w + b * block * k_padded + 64 * slice, 2 * block, y, ldy, y_is_f32, 0, (int)m,
                      first, valid, 2, DP);
        }
        _mm_setcsr(mxcsr);
        return;
    }
    for (int64_t u = first_unit; u < last_unit; ++u) {
        const int64_t b = u / row_chunks, row_end = (u % row_chunks + 1) * UNIT_ROWS;
        const uint16_t *base = w + b * block * k_padded;
        const int64_t first = b * block;
        const int64_t valid = n - first < block ? n - first : block;
        for (int64_t i0 = (u % row_chunks) * UNIT_ROWS; i0 < m && i0 < row_end; i0 += ROWS) {
            const int rows = m - i0 < ROWS ? (int)(m - i0) : ROWS;
            if (block == 64) row_group(x32, ld32, base, 128, y, ldy, y_is_f32, i0, rows, first, valid, 4, DP);
            else row_group(x32, ld32, base, 64, y, ldy, y_is_f32, i0, rows, first, valid, 2, DP);
        }
    }
    _mm_setcsr(mxcsr);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Stores the fp32 tile sums c (rows x 32 outputs, 32 floats apart) into y: rows row0.., outputs first..
 * (`valid` of them). */
static inline void amx_store(const float *c, int64_t rows, void *y, int64_t ldy, int y_is_f32, int64_t row0,
                             int64_t first, int64_t valid) {
    for (int64_t v = 0; v < 2 && 16 * v < valid; ++v) {
        const int64_t left = valid - 16 * v;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        for (int64_t r = 0; r < rows; ++r)
            store16(y, (row0 + r) * ldy + first + 16 * v, _mm512_loadu_ps(c + r * 32 + 16 * v), mask, y_is_f32);
    }
}

/* Units [first_unit, last_unit) (each output block B, rows [16 j, 16 j + 16)) on AMX tiles. A unit and the
 * next one when it holds the next 16 rows of the same block run together: per 32 outputs of the block and per
 * 32 inputs, each 16 outputs' input pairs load once as a B tile (tiles 6, 7; the blocked layout is AMX's:
 * tile row p = the 16 outputs' (2p, 2p + 1) pairs, 4B bytes apart) and meet both units' 16 rows of x (tiles
 * 4, 5: bf16 pairs, packed_gemm_x), into fp32 tiles 0-3. tdpbf16ps sums in another order than the FMA /
 * vdpbf16ps routines, so a product of m rows takes this routine wherever it runs (packed_gemm_on_amx); each
 * output's sum runs over the inputs in the same order however units are split, so the bits agree there. */
static void packed_gemm_units_amx(const float *x32, const uint16_t *w, void *y, int64_t ldy, int64_t y_is_f32,
                                  int64_t m, int64_t n, int64_t k, int64_t k_padded, int64_t block,
                                  int64_t first_unit, int64_t last_unit) {
    const int64_t row_bytes = 4 * f32_row_length(k), row_chunks = (m + UNIT_ROWS - 1) / UNIT_ROWS;
    const int64_t b_stride = 4 * block;  /* bytes from one input pair's row of a block to the next */
    TileConfig config;
    memset(&config, 0, sizeof(config));
    config.palette = 1;
    for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
    float c[2 * 16 * 32];
    for (int64_t u = first_unit; u < last_unit;) {
        const int64_t b = u / row_chunks, row0 = (u % row_chunks) * UNIT_ROWS;
        const int both = u + 1 < last_unit && (u + 1) / row_chunks == b;  /* the next 16 rows too */
        const char *a = (const char *)(x32 + row0 * f32_row_length(k));
        const char *a2 = a + 16 * row_bytes;
        for (int64_t half = 0; half < block; half += 32) {
            const int64_t first = b * block + half;
            if (first >= n) break;
            const uint16_t *base = w + b * block * k_padded + 2 * half;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t p = 0; p < k / 2; p += 16) {  /* 16 input pairs per tile */
                const uint16_t *rows = base + p * 2 * block;
                if (p + 32 < k / 2)  /* tile loads stream slower than vector loads: fetch two tiles ahead */
                    for (int r = 0; r < 16; ++r) {
                        const char *line = (const char *)(rows + 32 * 2 * block) + r * b_stride;
                        _mm_prefetch(line, _MM_HINT_T0);
                        _mm_prefetch(line + 64, _MM_HINT_T0);
                    }
                _tile_loadd(4, a + 4 * p, row_bytes);
                _tile_loadd(6, rows, b_stride);
                _tile_loadd(7, rows + 32, b_stride);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                if (both) {
                    _tile_loadd(5, a2 + 4 * p, row_bytes);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            const int64_t valid = n - first < 32 ? n - first : 32;
            _tile_stored(0, c, 4 * 32);
            _tile_stored(1, c + 16, 4 * 32);
            amx_store(c, m - row0 < 16 ? m - row0 : 16, y, ldy, (int)y_is_f32, row0, first, valid);
            if (both) {
                _tile_stored(2, c, 4 * 32);
                _tile_stored(3, c + 16, 4 * 32);
                amx_store(c, m - row0 - 16 < 16 ? m - row0 - 16 : 16, y, ldy, (int)y_is_f32, row0 + 16, first, valid);
            }
        }
        u += both ? 2 : 1;
    }
    _tile_release();
}

/* Turns the AMX routine on for products of at least `min_rows` rows, or off (0): asks the kernel for the tile
 * state first (arch_prctl ARCH_REQ_XCOMP_PERM, once per process is enough). Returns the rows now in force:
 * 0 when off or refused. */
int64_t packed_gemm_set_amx(int64_t min_rows) {
    if (min_rows > 0 && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0)
        min_rows = 0;
    packed_gemm_amx_rows = min_rows > 0 ? min_rows : 0;
    return packed_gemm_amx_rows;
}
#else
int64_t packed_gemm_set_amx(int64_t min_rows) {
    (void)min_rows;
    return 0;
}
#endif

static inline void packed_gemm_units(const float *x32, const uint16_t *w, void *y, int64_t ldy, int64_t y_is_f32,
                                     int64_t m, int64_t n, int64_t k, int64_t k_padded, int64_t block,
                                     int64_t first_unit, int64_t last_unit) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (packed_gemm_on_amx(m, k)) {
        packed_gemm_units_amx(x32, w, y, ldy, y_is_f32, m, n, k, k_padded, block, first_unit, last_unit);
        return;
    }
#endif
    if (packed_gemm_dpbf16)
        packed_gemm_units_dot(x32, w, y, ldy, y_is_f32, m, n, k, k_padded, block, first_unit, last_unit, 1);
    else
        packed_gemm_units_dot(x32, w, y, ldy, y_is_f32, m, n, k, k_padded, block, first_unit, last_unit, 0);
}
#endif
