/* What the prefill kernels (prefill_attention.c in bf16, prefill_attention_f32.c in fp32) share: their work
 * split, one task per (chunk, key/value head, block of PREFILL_QUERY_BLOCK query tokens), numbered chunk by
 * chunk, then block by block, then head by head (the threads claim them one at a time: the diagonal blocks
 * cost less); and where token t of the sequence in a slot sits in either KV layout. */
#ifndef PREFILL_TASKS_H
#define PREFILL_TASKS_H
#include <stdint.h>

#define PREFILL_QUERY_BLOCK 32

typedef struct {
    int64_t chunk, head;
    int64_t first, last;  /* the chunk's query tokens [first, last) */
} PrefillTask;

/* tasks of a chunk of `len` query tokens: its blocks of PREFILL_QUERY_BLOCK tokens x the key/value heads */
static inline int64_t prefill_chunk_tasks(int64_t len, int64_t num_kv_heads) {
    return (len + PREFILL_QUERY_BLOCK - 1) / PREFILL_QUERY_BLOCK * num_kv_heads;
}

static inline int64_t prefill_num_tasks(const int64_t *lens, int64_t num_chunks, int64_t num_kv_heads) {
    int64_t total = 0;
    for (int64_t c = 0; c < num_chunks; ++c) total += prefill_chunk_tasks(lens[c], num_kv_heads);
    return total;
}

static inline PrefillTask prefill_task(int64_t index, const int64_t *lens, int64_t num_kv_heads) {
    int64_t c = 0;
    for (; index >= prefill_chunk_tasks(lens[c], num_kv_heads); ++c)
        index -= prefill_chunk_tasks(lens[c], num_kv_heads);
    const int64_t first = index / num_kv_heads * PREFILL_QUERY_BLOCK;
    const PrefillTask task = {c, index % num_kv_heads, first,
                              first + PREFILL_QUERY_BLOCK < lens[c] ? first + PREFILL_QUERY_BLOCK : lens[c]};
    return task;
}

/* the element offset of token t of the sequence in `slot`: paged, through the block table `tables` (page
 * `t / page_tokens` of the slot's row); contiguous (tables NULL), one page per slot */
static inline int64_t row_at(const int64_t *tables, int64_t table_stride, int64_t slot, int64_t page_stride,
                             int64_t page_tokens, int64_t token_stride, int64_t t) {
    if (tables == NULL) return slot * page_stride + t * token_stride;
    return tables[slot * table_stride + t / page_tokens] * page_stride + (t % page_tokens) * token_stride;
}

#endif
