/* A whole decode step of a Llama-family decoder's layers in one call, in fp32 on AVX2/FMA CPUs: one row per
 * decoding sequence, the weights in the per-op path's panels (csrc/gemm_f32.h, packed at load by
 * engine/model/linear.py), the KV cache in the contiguous layout.
 *
 * Why: the fp32 per-op path runs ~35 torch ops per layer (~1,000 per step for SmolLM2), each a Python call and
 * a fork/join of the OpenMP team; a thread that loses its core to another process (the HTTP proxy, Ray's
 * daemons) holds its partner at every join. Here one parallel region runs every layer, the products' units and
 * attention's (row, head) tasks are claimed from a shared counter (csrc/step_phases.h), and the threads meet
 * at a barrier between phases, as in csrc/decode_step_bf16.c. Per layer:
 *   hidden += pending residual, normed = rms_norm(hidden)          rows
 *   qkv = normed @ Wqkv^T                                            units (csrc/gemm_f32.h)
 *   rope(q, k), k and v into the cache, decode attention             (row, key/value head) tasks
 *   proj = attn @ Wo^T                                               units
 *   hidden += proj, normed = rms_norm(hidden)                        rows
 *   gate_up = normed @ Wgu^T, act = silu(gate) * up                  (x rows, gate block) tasks: a gate block
 *                                                                    and the up block of the same columns
 *   proj = act @ Wdown^T                                             units
 * and hidden += proj after the last layer.
 *
 * The products' bits equal the per-op path's with gemm_f32 (same routine); the residual adds, the norm's two
 * scalings and RoPE round as torch's fp32 ops do (this file is built without FMA contraction, -std=c11); the
 * norm's mean, the attention and SiLU's exp are summed and rounded their own way, a few ulps from torch's.
 * The engine's exactness tests hold its greedy tokens to transformers' (tests/engine/model/test_decode_step.py
 * compares it with the per-op path). */
#if !defined(__AVX2__) || !defined(__FMA__)
#error "decode_step_f32 needs AVX2 and FMA (the engine keeps the per-op path)"
#endif
#define _GNU_SOURCE
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "elementwise_f32.h"
#include "gemm_f32.h"
#include "step_phases.h"

typedef struct {
    const float *input_norm, *post_norm;
    const float *qkv, *o, *gate_up, *down;  /* weights [out, in] in panels (csrc/gemm_f32.h) */
    float *k_cache, *v_cache;  /* [slots, max_len, kv_heads, head_dim] */
    int64_t slot_stride, token_stride, max_len, num_slots, window;  /* strides in elements; window 0: none */
} LayerF32;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    float eps, scale;
    const float *rope_table;  /* [positions, 2, head_dim]: cos, sin */
} ShapeF32;

/* y = x @ w^T over the product's units, claimed as they come */
static void gemm_claimed(const float *x, int64_t ldx, const float *w, float *y, int64_t m, int64_t n, int64_t k,
                         Claims *claims) {
    const int64_t units = gemm_f32_num_units(m, n);
    int64_t first, last;
    while (claim(claims, units, &first, &last)) gemm_f32_units(x, ldx, w, y, n, m, n, k, first, last);
    end_phase(claims, units);
}

static void norm_share(float *hidden, const float *delta, const float *weight, float *out, int64_t m,
                       int64_t width, float eps, int tid, int threads) {
    int64_t first, last;
    share(m, tid, threads, &first, &last);
    for (int64_t r = first; r < last; ++r)
        add_rms_norm_row(hidden + r * width, delta == NULL ? NULL : delta + r * width, weight, out + r * width,
                         width, eps);
}

/* the 8 lane sums of a0..a7, in that order, in one vector */
static inline __m256 lane_sums8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                                __m256 a7) {
    const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
}

/* row[t] = q . key(t) * scale for t < count; returns the largest. Eight keys at a time (eight independent
 * accumulator chains: one chain per key is bound by the FMA latency), the rest one by one. */
static float scores_for(const float *query, const float *k_cache, const int64_t *offsets, int64_t count,
                        int64_t d, float scale, float *row) {
    float peak = -INFINITY;
    int64_t t = 0;
    for (; t + 8 <= count; t += 8) {
        __m256 acc[8];
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
        for (int64_t j = 0; j < d; j += 8) {
            const __m256 qv = _mm256_loadu_ps(query + j);
            for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k_cache + offsets[t + u] + j), acc[u]);
        }
        const __m256 dots = _mm256_mul_ps(lane_sums8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]),
                                          _mm256_set1_ps(scale));
        _mm256_storeu_ps(row + t, dots);
        for (int u = 0; u < 8; ++u) peak = row[t + u] > peak ? row[t + u] : peak;
    }
    for (; t < count; ++t) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < d; j += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(query + j), _mm256_loadu_ps(k_cache + offsets[t] + j), acc);
        row[t] = sum_lanes_f32(acc) * scale;
        peak = row[t] > peak ? row[t] : peak;
    }
    return peak;
}

/* attention of `group` query heads q [group, d] over `count` key/value rows at offsets (one head's columns,
 * d % 8 == 0): out [group, d]; scores [group, count] scratch. The values' sum keeps up to 8 accumulators (64
 * columns) across the tokens, each chain independent of the others. */
static void attend(const float *q, const float *k_cache, const float *v_cache, const int64_t *offsets,
                   int64_t count, int64_t group, int64_t d, float scale, float *scores, float *out) {
    for (int64_t g = 0; g < group; ++g) {
        float *row = scores + g * count;
        const float peak = scores_for(q + g * d, k_cache, offsets, count, d, scale, row);
        __m256 sums = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= count; t += 8) {
            const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + t), _mm256_set1_ps(peak)));
            _mm256_storeu_ps(row + t, e);
            sums = _mm256_add_ps(sums, e);
        }
        float total = sum_lanes_f32(sums);
        for (; t < count; ++t) {
            row[t] = expf(row[t] - peak);
            total += row[t];
        }
        const __m256 inverse = _mm256_set1_ps(1.0f / total);
        for (int64_t j = 0; j < d; j += 64) {
            const int vectors = d - j < 64 ? (int)((d - j) / 8) : 8;
            __m256 acc[8];
            for (int u = 0; u < vectors; ++u) acc[u] = _mm256_setzero_ps();
            for (int64_t s = 0; s < count; ++s) {
                const __m256 p = _mm256_set1_ps(row[s]);
                const float *value = v_cache + offsets[s] + j;
                for (int u = 0; u < vectors; ++u) acc[u] = _mm256_fmadd_ps(p, _mm256_loadu_ps(value + 8 * u), acc[u]);
            }
            for (int u = 0; u < vectors; ++u) _mm256_storeu_ps(out + g * d + j + 8 * u, _mm256_mul_ps(acc[u], inverse));
        }
    }
}

/* Checks every row's slot and position against every layer's cache before anything is written: returns the
 * first bad row + 1, or 0. */
static int64_t check_rows(const LayerF32 *layers, int64_t num_layers, const int64_t *slots,
                          const int64_t *positions, int64_t m) {
    for (int64_t i = 0; i < m; ++i)
        for (int64_t l = 0; l < num_layers; ++l)
            if (slots[i] < 0 || positions[i] < 0 || slots[i] >= layers[l].num_slots
                || positions[i] >= layers[l].max_len)
                return i + 1;
    return 0;
}

/* hidden [m, hidden] holds the embedded tokens; on return, the last layer's output (residual added).
 * Row i decodes the sequence in slots[i] at positions[i] (its context positions[i] + 1 tokens).
 * Scratch buffers: normed, proj [m, hidden]; qkv [m, (H + 2 KVH) D]; attn [m, H D]; gate_up [m, 2 I];
 * act [m, I]. Returns 0, or the first row + 1 whose slot / position is outside a cache (nothing written). */
int64_t decode_step_f32(const ShapeF32 *shape, const LayerF32 *layers, float *hidden, int64_t m,
                        const int64_t *slots, const int64_t *positions, float *normed, float *qkv, float *attn,
                        float *proj, float *gate_up, float *act, int64_t num_threads) {
    const int64_t bad = check_rows(layers, shape->num_layers, slots, positions, m);
    if (bad) return bad;
    const int64_t width = shape->hidden, d = shape->head_dim, heads = shape->num_heads, kv_heads = shape->num_kv_heads;
    const int64_t q_size = heads * d, kv_size = kv_heads * d, qkv_width = q_size + 2 * kv_size;
    const int64_t inter = shape->intermediate, group = heads / kv_heads;
    /* gate block b and up block b cover the same columns when the intermediate size is a whole number of units
     * (of whole panels) */
    const int paired_mlp = inter % GEMM_F32_UNIT == 0;
    int64_t max_len = 1;
    for (int64_t i = 0; i < m; ++i) max_len = positions[i] + 1 > max_len ? positions[i] + 1 : max_len;
    Barrier barrier = {0, 0, (int)num_threads, 0};
    Counter counter = {0};
    #pragma omp parallel num_threads(num_threads)
    {
        const int tid = omp_get_thread_num(), threads = omp_get_num_threads();
        __atomic_store_n(&barrier.threads, threads, __ATOMIC_RELAXED);  /* every thread stores the same value */
        Claims claims = {&counter, 0, threads};
        float *scores = (float *)malloc(sizeof(float) * group * max_len);
        int64_t *offsets = (int64_t *)malloc(sizeof(int64_t) * max_len);
        const float *pending = NULL;  /* the residual not yet added to hidden */
        int64_t first, last;
        for (int64_t l = 0; l < shape->num_layers; ++l) {
            const LayerF32 *layer = layers + l;
            norm_share(hidden, pending, layer->input_norm, normed, m, width, shape->eps, tid, threads);
            barrier_wait(&barrier);
            gemm_claimed(normed, width, layer->qkv, qkv, m, qkv_width, width, &claims);
            barrier_wait(&barrier);
            while (claim(&claims, m * kv_heads, &first, &last)) for (int64_t task = first; task < last; ++task) {
                const int64_t row = task / kv_heads, h = task % kv_heads;
                float *q = qkv + row * qkv_width + h * group * d;
                float *k = qkv + row * qkv_width + q_size + h * d, *v = k + kv_size;
                const float *table = shape->rope_table + positions[row] * 2 * d;
                for (int64_t g = 0; g < group; ++g) rope_head(q + g * d, table, table + d, d / 2);
                rope_head(k, table, table + d, d / 2);
                const int64_t at = slots[row] * layer->slot_stride + positions[row] * layer->token_stride + h * d;
                memcpy(layer->k_cache + at, k, sizeof(float) * d);
                memcpy(layer->v_cache + at, v, sizeof(float) * d);
                const int64_t len = positions[row] + 1;
                const int64_t start = (layer->window > 0 && len > layer->window) ? len - layer->window : 0;
                for (int64_t t = start; t < len; ++t)
                    offsets[t - start] = slots[row] * layer->slot_stride + t * layer->token_stride;
                attend(q, layer->k_cache + h * d, layer->v_cache + h * d, offsets, len - start, group, d,
                       shape->scale, scores, attn + row * q_size + h * group * d);
            }
            end_phase(&claims, m * kv_heads);
            barrier_wait(&barrier);
            gemm_claimed(attn, q_size, layer->o, proj, m, width, q_size, &claims);
            barrier_wait(&barrier);
            norm_share(hidden, proj, layer->post_norm, normed, m, width, shape->eps, tid, threads);
            barrier_wait(&barrier);
            if (paired_mlp) {  /* a gate block, the up block of the same columns, then SiLU x up on them */
                const int64_t blocks = inter / GEMM_F32_UNIT, row_blocks = (m + GEMM_F32_ROWS - 1) / GEMM_F32_ROWS;
                while (claim(&claims, blocks * row_blocks, &first, &last)) for (int64_t t = first; t < last; ++t) {
                    const int64_t p0 = (t % blocks) * GEMM_F32_UNIT_PANELS, p1 = p0 + GEMM_F32_UNIT_PANELS;
                    const int64_t c0 = p0 * GEMM_F32_PANEL, c1 = p1 * GEMM_F32_PANEL, up = inter / GEMM_F32_PANEL;
                    const int64_t i0 = (t / blocks) * GEMM_F32_ROWS;
                    const int64_t i1 = i0 + GEMM_F32_ROWS < m ? i0 + GEMM_F32_ROWS : m;
                    gemm_f32_region(normed, width, layer->gate_up, gate_up, 2 * inter, 2 * inter, width, p0, p1, i0,
                                    i1);
                    gemm_f32_region(normed, width, layer->gate_up, gate_up, 2 * inter, 2 * inter, width, up + p0,
                                    up + p1, i0, i1);
                    for (int64_t row = i0; row < i1; ++row)
                        silu_mul_columns(gate_up + row * 2 * inter, gate_up + row * 2 * inter + inter,
                                         act + row * inter, c0, c1);
                }
                end_phase(&claims, blocks * row_blocks);
            } else {
                gemm_claimed(normed, width, layer->gate_up, gate_up, m, 2 * inter, width, &claims);
                barrier_wait(&barrier);
                share(m, tid, threads, &first, &last);
                for (int64_t row = first; row < last; ++row)
                    silu_mul_columns(gate_up + row * 2 * inter, gate_up + row * 2 * inter + inter, act + row * inter,
                                     0, inter);
            }
            barrier_wait(&barrier);
            gemm_claimed(act, inter, layer->down, proj, m, width, inter, &claims);
            barrier_wait(&barrier);
            pending = proj;
        }
        share(m * width, tid, threads, &first, &last);
        for (int64_t i = first; i < last; ++i) hidden[i] = hidden[i] + proj[i];
        free(scores);
        free(offsets);
    }
    return 0;
}
