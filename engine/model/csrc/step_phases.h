/* The threads of a fused step's one parallel region meet at barriers between phases and share a phase's work
 * items through a counter: used by csrc/decode_step_bf16.c and csrc/decode_step_f32.c. */
#ifndef STEP_PHASES_H
#define STEP_PHASES_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The last thread to arrive bumps the generation; the others spin on it for a few microseconds (phases are
 * tens of microseconds apart on a quiet box), then sleep on a futex, so a thread descheduled on a busy box
 * costs its partner no CPU. The releaser wakes sleepers only when there are any (no syscall on the fast path). */
typedef struct {
    int count, generation, threads, sleepers;
} Barrier;

#ifndef SPINS_BEFORE_SLEEP  /* -D for experiments: 50,000 made no measurable difference served (docs/SPEED.md) */
#define SPINS_BEFORE_SLEEP 2000
#endif

static void barrier_wait(Barrier *barrier) {
    const int generation = __atomic_load_n(&barrier->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&barrier->count, 1, __ATOMIC_ACQ_REL) == barrier->threads) {
        __atomic_store_n(&barrier->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&barrier->generation, generation + 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&barrier->sleepers, __ATOMIC_SEQ_CST))
            syscall(SYS_futex, &barrier->generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
        return;
    }
    for (int spins = 0; spins < SPINS_BEFORE_SLEEP; ++spins) {
        if (__atomic_load_n(&barrier->generation, __ATOMIC_ACQUIRE) != generation) return;
        _mm_pause();
    }
    __atomic_add_fetch(&barrier->sleepers, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&barrier->generation, __ATOMIC_SEQ_CST) == generation)
        syscall(SYS_futex, &barrier->generation, FUTEX_WAIT_PRIVATE, generation, NULL, NULL, 0);
    __atomic_sub_fetch(&barrier->sleepers, 1, __ATOMIC_SEQ_CST);
}

/* [first, last) of `total` items for thread `tid` of `threads`, in contiguous, near-equal shares */
static inline void share(int64_t total, int tid, int threads, int64_t *first, int64_t *last) {
    *first = total * tid / threads;
    *last = total * (tid + 1) / threads;
}

/* The work items of a phase (a product's units, attention's (row, head) tasks) are claimed CLAIM at a time
 * from one counter shared by the threads, not split in fixed shares: on a box where other processes wake up
 * (Ray's daemons, the HTTP proxy), a thread that loses its core for a while leaves its items to its partner
 * instead of making it wait at the next barrier. The counter only grows: every thread of a phase ends it with
 * one claim past the end, so each phase starts `(claims of the last phase + threads) * CLAIM` further on, a
 * number every thread computes alike (`Claims.base`, a thread's own copy). Which thread computes an item does
 * not change its bits. */
#define CLAIM 2

typedef struct {
    int64_t next;  /* shared */
} Counter;

typedef struct {
    Counter *counter;
    int64_t base;  /* this thread's copy: where the current phase's items start on the counter */
    int threads;
} Claims;

/* the next [*first, *last) of the phase's `total` items for this thread; 0 once the phase has none left */
static inline int claim(Claims *claims, int64_t total, int64_t *first, int64_t *last) {
    const int64_t at = __atomic_fetch_add(&claims->counter->next, CLAIM, __ATOMIC_RELAXED) - claims->base;
    if (at >= total) return 0;
    *first = at;
    *last = at + CLAIM < total ? at + CLAIM : total;
    return 1;
}

/* after a phase of `total` items, claimed by every thread until claim returned 0 (before the barrier) */
static inline void end_phase(Claims *claims, int64_t total) {
    claims->base += ((total + CLAIM - 1) / CLAIM + claims->threads) * CLAIM;
}

#endif
