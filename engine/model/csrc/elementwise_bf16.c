/* The bf16 decoder's elementwise ops, each one pass in C instead of 3-7 torch ops (each a dispatch and a
 * pass over memory): residual add + RMSNorm, RoPE on q and k in place, SiLU(gate) * up.
 *
 * Every op rounds to bf16 where the torch ops it replaces round (after each torch op), so it computes what
 * engine/model/elementwise.py's torch version computes, up to the order of the fp32 sum in RMSNorm.
 * Plain C with -march=native: gcc vectorises the loops for whatever the CPU has (AVX2 or AVX-512).
 */
#include "elementwise_bf16.h"
#include "elementwise_entry.h"

ELEMENTWISE_ENTRY_POINTS(bf16, uint16_t)
