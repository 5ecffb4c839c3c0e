/* A whole decode step of a Llama-family decoder's layers in one call: bf16, one row per decoding sequence (any
 * number), weights in oneDNN's blocked layout (packed_gemm_bf16.h), the KV cache in the contiguous layout.
 *
 * Why: at batch 1 a step only streams the weights (~270 MB for SmolLM2-135M), ~8 ms at the bandwidth two cores
 * reach here, but the per-op path ran ~300 kernel calls per step, each a Python call and a fork/join of the
 * OpenMP team. With OMP_WAIT_POLICY=PASSIVE (or a busy box) every join put a thread to sleep and every fork
 * woke it (a futex each, tens of us), and the decode attention ran one sequence per thread, so batch 1 used
 * one core. Here one parallel region runs every layer; the threads meet at a barrier between phases that
 * spins briefly, then sleeps on a futex (barrier_wait).
 *
 * Per layer, each phase split over the threads (rows in fixed shares; work units and (row, head) tasks claimed
 * from a shared counter as threads get to them, `claim`), with a barrier after each (7 per layer):
 *   hidden += pending residual, normed = rms_norm(hidden)          rows
 *   qkv = normed @ Wqkv^T                                            work units (packed_gemm_bf16.h)
 *   rope(q, k) in place, k, v into the cache, decode attention       (row, key/value head) pairs
 *   proj = attn @ Wo^T                                               work units
 *   hidden += proj, normed = rms_norm(hidden)                        rows
 *   gate_up = normed @ Wgu^T, act = silu(gate) * up                  gate units and the up units of the same
 *                                                                    columns (a barrier between the two when
 *                                                                    the intermediate size is not a whole
 *                                                                    number of 64-output blocks)
 *   proj = act @ Wdown^T                                             work units
 * and hidden += proj after the last layer. Every value is computed by the same routine, summed in the same
 * order and rounded where the per-op kernels round (packed_gemm_bf16.h, elementwise_bf16.h,
 * decode_attention_bf16.h), so the step's bits equal the per-op path's with the packed GEMM for every
 * product (tests/engine/model/test_decode_step.py).
 */
#if !defined(__AVX512BF16__) || !defined(__AVX512F__)
#error "decode_step_bf16 needs AVX512-BF16 (the engine keeps the per-op path)"
#endif
#define _GNU_SOURCE
#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../attention/csrc/decode_attention_bf16.h"
#include "elementwise_bf16.h"
#include "packed_gemm_bf16.h"
#include "step_phases.h"

typedef struct {
    const uint16_t *weight;  /* packed bytes */
    int64_t out_features, in_features, k_padded, block;
} Packed;

typedef struct {
    const uint16_t *input_norm, *post_norm;
    Packed qkv, o, gate_up, down;
    uint16_t *k_cache, *v_cache;  /* [slots, max_len, kv_heads, head_dim] */
    int64_t slot_stride, token_stride, max_len, num_slots, window;  /* strides in elements; window 0: none */
} Layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    float eps, scale;
    const uint16_t *rope_table;  /* [positions, 2, head_dim]: cos, sin */
} Shape;


/* the product's work units, claimed as they come; x32 is the thread's own copy of x (packed_gemm_x: each
 * thread that gets a unit converts every row, which costs a few microseconds and saves a barrier) */
static void gemm_claimed(const uint16_t *x, int64_t ldx, const Packed *w, uint16_t *y, int64_t m, float *x32,
                         Claims *claims) {
    const int64_t units = packed_gemm_num_units(m, w->out_features, w->in_features, w->block);
    int64_t first, last;
    int converted = 0;
    while (claim(claims, units, &first, &last)) {
        if (!converted) packed_gemm_x(x, ldx, m, w->in_features, x32, packed_gemm_x_pairs(m, w->in_features));
        converted = 1;
        packed_gemm_units(x32, w->weight, y, w->out_features, 0, m, w->out_features, w->in_features, w->k_padded,
                          w->block, first, last);
    }
    end_phase(claims, units);
}

static void norm_share(uint16_t *hidden, const uint16_t *delta, const uint16_t *weight, uint16_t *out, int64_t m,
                       int64_t width, float eps, int tid, int threads) {
    int64_t first, last;
    share(m, tid, threads, &first, &last);
    for (int64_t r = first; r < last; ++r)
        add_rms_norm_row(hidden + r * width, delta == NULL ? NULL : delta + r * width, weight, out + r * width,
                         width, eps);
}

/* Checks every row's slot and position against every layer's cache before anything is written: returns the
 * first bad row + 1, or 0. */
static int64_t check_rows(const Layer *layers, int64_t num_layers, const int64_t *slots, const int64_t *positions,
                          int64_t m) {
    for (int64_t i = 0; i < m; ++i)
        for (int64_t l = 0; l < num_layers; ++l)
            if (slots[i] < 0 || positions[i] < 0 || slots[i] >= layers[l].num_slots
                || positions[i] >= layers[l].max_len)
                return i + 1;
    return 0;
}

/* attention's tasks are whole rows from this many rows on, (row, key/value head) below it */
#define ROW_TASKS 8

/* hidden [m, hidden] holds the embedded tokens; on return, the last layer's output (residual added).
 * Row i decodes the sequence in slots[i] at positions[i] (its context positions[i] + 1 tokens).
 * Scratch buffers: normed, proj [m, hidden]; qkv [m, (H + 2 KVH) D]; attn [m, H D]; gate_up [m, 2 I];
 * act [m, I]. Returns 0, or the first row + 1 whose slot / position is outside a cache (nothing written). */
int64_t decode_step_bf16(const Shape *shape, const Layer *layers, uint16_t *hidden, int64_t m,
                         const int64_t *slots, const int64_t *positions, uint16_t *normed, uint16_t *qkv,
                         uint16_t *attn, uint16_t *proj, uint16_t *gate_up, uint16_t *act, int64_t num_threads) {
    const int64_t bad = check_rows(layers, shape->num_layers, slots, positions, m);
    if (bad) return bad;
    const int64_t width = shape->hidden, d = shape->head_dim, heads = shape->num_heads, kv_heads = shape->num_kv_heads;
    const int64_t q_size = heads * d, kv_size = kv_heads * d, qkv_width = q_size + 2 * kv_size;
    const int64_t inter = shape->intermediate, group = heads / kv_heads;
    /* the gate_up product's units split into gate and up halves that cover the same columns when the
     * intermediate size is a whole number of 64-output blocks (SmolLM2: 1536) */
    const int paired_mlp = inter % 64 == 0;
    /* attention's tasks: whole rows from ROW_TASKS rows on, else (row, key/value head) */
    const int64_t task_heads = m >= ROW_TASKS ? kv_heads : 1, tasks = m * kv_heads / task_heads;
    int64_t widest = width > q_size ? width : q_size;
    widest = widest > inter ? widest : inter;
    int64_t max_len = 1;
    for (int64_t i = 0; i < m; ++i) max_len = positions[i] + 1 > max_len ? positions[i] + 1 : max_len;
    Barrier barrier = {0, 0, (int)num_threads, 0};
    Counter counter = {0};
    #pragma omp parallel num_threads(num_threads)
    {
        const int tid = omp_get_thread_num(), threads = omp_get_num_threads();
        __atomic_store_n(&barrier.threads, threads, __ATOMIC_RELAXED);  /* every thread stores the same value */
        Claims claims = {&counter, 0, threads};
        float *scores = (float *)malloc(sizeof(float) * heads * max_len);
        int64_t *offsets = (int64_t *)malloc(sizeof(int64_t) * max_len);
        float *query = (float *)malloc(sizeof(float) * q_size);
        float *result = (float *)malloc(sizeof(float) * q_size);
        __m512bh *q_bf16 = (__m512bh *)aligned_alloc(64, sizeof(__m512bh) * heads * (d / 32));
        float *x32 = (float *)malloc(sizeof(float) * packed_gemm_x_rows(m) * f32_row_length(widest));
        const uint16_t *pending = NULL;  /* the residual not yet added to hidden */
        int64_t first, last;
        for (int64_t l = 0; l < shape->num_layers; ++l) {
            const Layer *layer = layers + l;
            norm_share(hidden, pending, layer->input_norm, normed, m, width, shape->eps, tid, threads);
            barrier_wait(&barrier);
            gemm_claimed(normed, width, &layer->qkv, qkv, m, x32, &claims);
            barrier_wait(&barrier);
            /* per row, or per (row, key/value head) for a few rows (so both threads get work): rope on the
             * task's query heads and key heads, its key and value rows into the cache, attention of those query
             * heads over the slot's cache (every head's values are computed by the same routines as on the
             * per-op path; a task only reads its own heads). A task of whole rows reads the cache's token rows
             * whole, as decode_one_bf16 prefetches them, and works out the row's offsets once (no faster alone:
             * 2026-12-07, Xeon with AMX; with the prefetch the step at batch 64 ran 44.9-49.0 vs 51.1-53.1 ms) */
            while (claim(&claims, tasks, &first, &last)) for (int64_t task = first; task < last; ++task) {
                const int64_t row = task * task_heads / kv_heads, h0 = task * task_heads % kv_heads;
                const uint16_t *table = shape->rope_table + positions[row] * 2 * d;
                const int64_t at = slots[row] * layer->slot_stride + positions[row] * layer->token_stride;
                for (int64_t h = h0; h < h0 + task_heads; ++h) {
                    uint16_t *q = qkv + row * qkv_width + h * group * d;
                    uint16_t *k = qkv + row * qkv_width + q_size + h * d, *v = k + kv_size;
                    for (int64_t g = 0; g < group; ++g) rope_head(q + g * d, table, table + d, d / 2);
                    rope_head(k, table, table + d, d / 2);
                    memcpy(layer->k_cache + at + h * d, k, sizeof(uint16_t) * d);
                    memcpy(layer->v_cache + at + h * d, v, sizeof(uint16_t) * d);
                }
                const int64_t len = positions[row] + 1;
                const int64_t start = (layer->window > 0 && len > layer->window) ? len - layer->window : 0;
                for (int64_t t = start; t < len; ++t)
                    offsets[t - start] = slots[row] * layer->slot_stride + t * layer->token_stride;
                const uint16_t *q = qkv + row * qkv_width + h0 * group * d;
                const int64_t task_width = task_heads * group * d;
                for (int64_t j = 0; j < task_width; ++j) query[j] = bf16_to_f32(q[j]);
                decode_one_bf16(query, layer->k_cache + h0 * d, layer->v_cache + h0 * d, offsets, len - start,
                                task_heads * group, task_heads, d, shape->scale, scores, q_bf16, result);
                for (int64_t j = 0; j < task_width; j += 16)
                    _mm256_storeu_si256((__m256i *)(attn + row * q_size + h0 * group * d + j),
                                        ps_to_bf16x16(_mm512_loadu_ps(result + j)));
            }
            end_phase(&claims, tasks);
            barrier_wait(&barrier);
            gemm_claimed(attn, q_size, &layer->o, proj, m, x32, &claims);
            barrier_wait(&barrier);
            norm_share(hidden, proj, layer->post_norm, normed, m, width, shape->eps, tid, threads);
            barrier_wait(&barrier);
            if (paired_mlp) {  /* gate and up columns of the same units, then SiLU x up on them: no barrier */
                const Packed *w = &layer->gate_up;
                const int64_t half = packed_gemm_num_units(m, w->out_features, w->in_features, w->block) / 2;
                int converted = 0;
                while (claim(&claims, half, &first, &last)) {
                    if (!converted) packed_gemm_x(normed, width, m, width, x32, packed_gemm_x_pairs(m, width));
                    converted = 1;
                    packed_gemm_units(x32, w->weight, gate_up, w->out_features, 0, m, w->out_features, w->in_features,
                                      w->k_padded, w->block, first, last);
                    packed_gemm_units(x32, w->weight, gate_up, w->out_features, 0, m, w->out_features, w->in_features,
                                      w->k_padded, w->block, first + half, last + half);
                    for (int64_t u = first; u < last; ++u) {
                        int64_t col0, col1, row0, row1;
                        packed_gemm_unit_region(u, m, w->out_features, w->in_features, w->block, &col0, &col1, &row0, &row1);
                        for (int64_t row = row0; row < row1; ++row)
                            silu_mul_columns(gate_up + row * 2 * inter, gate_up + row * 2 * inter + inter,
                                             act + row * inter, col0, col1);
                    }
                }
                end_phase(&claims, half);
            } else {
                gemm_claimed(normed, width, &layer->gate_up, gate_up, m, x32, &claims);
                barrier_wait(&barrier);
                share(m * inter, tid, threads, &first, &last);
                for (int64_t row = first / inter; row * inter < last; ++row) {
                    const int64_t from = first > row * inter ? first - row * inter : 0;
                    const int64_t to = last < (row + 1) * inter ? last - row * inter : inter;
                    silu_mul_columns(gate_up + row * 2 * inter, gate_up + row * 2 * inter + inter, act + row * inter,
                                     from, to);
                }
            }
            barrier_wait(&barrier);
            gemm_claimed(act, inter, &layer->down, proj, m, x32, &claims);
            barrier_wait(&barrier);
            pending = proj;
        }
        /* the last layer's residual: hidden += proj, rounded as torch's bf16 add */
        share(m * width, tid, threads, &first, &last);
        for (int64_t i = first; i < last; ++i) hidden[i] = f32_to_bf16(bf16_to_f32(hidden[i]) + bf16_to_f32(proj[i]));
        free(scores);
        free(offsets);
        free(query);
        free(result);
        free(q_bf16);
        free(x32);
    }
    return 0;
}
