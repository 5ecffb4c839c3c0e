"""deploy/kuberay/ and the Dockerfile, checked without Docker or a Kubernetes cluster.

- Each RayService validates against KubeRay's v1 CRD schema (cut down to the fields the manifests reach:
  kuberay_schema.py says how; KUBERAY_CRD=path/to/ray.io_rayservices.yaml checks against the whole CRD).
- Its serveConfigV2 is serve_config.yaml's application: the same knobs and deployment, values differing only
  where a pod needs it (device, pool sizes, CPUs per replica, spreading replicas over pods).
- The pool budget fits the container: pool + host buffer + object store + runtime overhead within the
  memory limit (CPU), the pool within the GPU the manifest was sized for (GPU); Ray's CPUs and GPUs equal the
  container's.
- The Dockerfile's command is the one README documents (what `make serve` runs), it copies every package
  pyproject installs, installs the proxy guard in every Serve proxy, and its Ray is the manifests' rayVersion.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from deployments.app import deployment_options
from deployments.args import AppArgs, parse_bytes
from deployments.ingress.proxy_guard import CALLBACK_ENV, CALLBACK_PATH
from tests.deployments.multinode.kuberay_schema import crd_schema, validate

REPO = Path(__file__).resolve().parents[3]
MANIFESTS = {"cpu": REPO / "deploy/kuberay/rayservice.yaml", "gpu": REPO / "deploy/kuberay/rayservice-gpu.yaml"}
SCHEMA = Path(__file__).with_name("rayservice_v1_schema.json")
# Where a pod's application may differ from serve_config.yaml's (everything else must be equal).
POD_SPECIFIC_ARGS = {"device", "device_memory", "host_buffer", "cpus_per_rank", "placement"}
RUNTIME_OVERHEAD = 2 << 30  # Python, torch, Ray's worker processes: measured ~1.3 GiB per replica pod here
ENTRY_COMMAND = ["python", "-m", "deployments.launch", "serve_config.yaml"]
GiB = 1 << 30


def load(path: Path) -> dict:
    with open(path) as file:
        return yaml.safe_load(file)


def quantity(value: str | int) -> int:
    """A Kubernetes quantity ("6Gi", "512Mi", "2", 1) as a number (bytes for memory)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i)?", str(value))
    assert match, value
    number, suffix = match.groups()
    return int(float(number) * 1024 ** (" KMGT".index(suffix[0]) if suffix else 0))


def worker_group(manifest: dict) -> dict:
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def container(group: dict) -> dict:
    (only,) = group["template"]["spec"]["containers"]
    return only


@pytest.fixture(params=sorted(MANIFESTS))
def manifest(request) -> dict:
    return load(MANIFESTS[request.param])


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return load(REPO / "serve_config.yaml")


def test_manifests_match_kuberays_rayservice_schema(manifest):
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert validate(manifest, json.loads(SCHEMA.read_text())) == []


@pytest.mark.skipif(not os.environ.get("KUBERAY_CRD"), reason="KUBERAY_CRD: path to KubeRay's ray.io_rayservices.yaml")
def test_manifests_match_the_whole_crd(manifest):
    assert validate(manifest, crd_schema(load(Path(os.environ["KUBERAY_CRD"])))) == []


def test_the_schema_check_catches_mistakes():
    schema = json.loads(SCHEMA.read_text())
    broken = load(MANIFESTS["cpu"])
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    del worker_group(broken)["maxReplicas"]
    container(worker_group(broken))["resource"] = {}
    assert validate(broken, schema) == [
        "/spec/rayClusterConfig/headGroupSpec/rayStartParams/num-cpus: expected string, got int",
        "/spec/rayClusterConfig/workerGroupSpecs/0/maxReplicas: required",
        "/spec/rayClusterConfig/workerGroupSpecs/0/template/spec/containers/0/resource: unknown field",
    ]


def test_serve_config_v2_is_serve_config_yamls_application(manifest, serve_config):
    pod_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (ours,) = serve_config["applications"]
    (theirs,) = pod_config["applications"]
    assert set(theirs) == set(ours)
    (deployment,) = theirs["deployments"]  # the same deployment; how many replicas is the cluster's business
    assert {**deployment, "num_replicas": None} == {**ours["deployments"][0], "num_replicas": None}
    assert {key: theirs[key] for key in ("name", "route_prefix", "import_path")} == \
        {key: ours[key] for key in ("name", "route_prefix", "import_path")}
    assert set(theirs["args"]) == set(ours["args"])
    differing = {key for key in ours["args"] if theirs["args"][key] != ours["args"][key]}
    assert differing <= POD_SPECIFIC_ARGS, differing
    assert pod_config["http_options"] == {"host": "0.0.0.0", "port": serve_config["http_options"]["port"]}
    args = AppArgs.model_validate(theirs["args"])
    assert args.placement.spread_replicas and deployment_options(args)["max_replicas_per_node"] == 1


def test_the_pool_budget_fits_the_container(manifest):
    args = AppArgs.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"])
    group = worker_group(manifest)
    resources = container(group)["resources"]
    assert resources["limits"] == resources["requests"]  # a pool sized to a limit needs it guaranteed
    start = group["rayStartParams"]
    assert quantity(start["num-cpus"]) == quantity(resources["limits"]["cpu"]) == args.cpus_per_rank  # 1 replica/pod
    memory = quantity(resources["limits"]["memory"])
    object_store = int(start["object-store-memory"])
    host_side = args.host_buffer + object_store + RUNTIME_OVERHEAD
    if args.device == "cpu":
        assert args.device_memory + host_side <= memory
        assert "nvidia.com/gpu" not in resources["limits"]
    else:
        assert args.device == "cuda" and host_side <= memory
        assert resources["limits"]["nvidia.com/gpu"] == int(start["num-gpus"]) == 1
        gpu_memory = quantity(group["template"]["metadata"]["labels"]["elastic-serve/gpu-memory"])
        assert args.device_memory <= 0.9 * gpu_memory  # the CUDA context and NCCL need the rest


def test_the_image_is_what_readme_documents():
    dockerfile = (REPO / "Dockerfile").read_text()
    readme = (REPO / "README.md").read_text()
    (cmd,) = re.findall(r"^CMD (.+)$", dockerfile, re.MULTILINE)
    assert json.loads(cmd) == ENTRY_COMMAND
    assert "$(PY) " + " ".join(ENTRY_COMMAND[1:]) in (REPO / "Makefile").read_text()  # what `make serve` runs
    assert f"ENV {CALLBACK_ENV}={CALLBACK_PATH}" in dockerfile
    assert f"runs `{' '.join(ENTRY_COMMAND)}`" in readme
    assert "docker run --rm --network host elastic-serve:cpu" in readme
    copied = set(re.findall(r"^COPY --chown=\S+ (\w+) \1$", dockerfile, re.MULTILINE))
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = set(re.findall(r'"(\w+)\*"', pyproject.split("[tool.setuptools.packages.find]")[1].split("\n\n")[0]))
    assert packages and packages <= copied
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    for path in MANIFESTS.values():
        manifest = load(path)
        assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray_version
    assert "docker build -t elastic-serve:cpu ." in readme


def test_sizes_parse_like_the_app():
    assert quantity("6Gi") == 6 * GiB == parse_bytes("6GiB") and quantity("2") == 2
