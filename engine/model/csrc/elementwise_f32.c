/* The fp32 decoder's elementwise ops on AVX2/FMA, each one pass in C instead of 2-10 torch ops (a dispatch, an
 * OpenMP fork/join and a pass over memory each): residual add + RMSNorm, RoPE on q and k in place,
 * SiLU(gate) * up. Their roundings: csrc/elementwise_f32.h. */
#if !defined(__AVX2__) || !defined(__FMA__)
#error "elementwise_f32 needs AVX2 and FMA (the engine keeps the torch ops)"
#endif
#include "elementwise_entry.h"
#include "elementwise_f32.h"

ELEMENTWISE_ENTRY_POINTS(f32, float)
