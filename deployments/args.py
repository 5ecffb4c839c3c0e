"""`AppArgs`: the `args:` block of serve_config.yaml, validated before anything starts.

Unknown keys are errors (a misspelled knob must not silently fall back to a default). Sizes accept bytes
or strings like "1GiB" / "512MiB" / "2GB". `to_engine_config()` is the only place that builds the
engine's EngineConfig from them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_bytes(value: int | str) -> int:
    """`1073741824`, `"1GiB"` (binary), `"1GB"` (decimal), `"512M"` (binary, like docker) -> bytes."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '1GiB'")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a size must be > 0")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"cannot read {value!r} as a size (examples: 1073741824, '1GiB', '512MiB', '2GB')")
    number, prefix, binary, byte_suffix = match.groups()
    is_decimal = bool(prefix) and not binary and bool(byte_suffix)
    base = 1000 if is_decimal else 1024
    size = int(float(number) * base ** _POWERS[prefix.lower()])
    if size <= 0:
        raise ValueError("a size must be > 0")
    return size


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class MigrationArgs(BaseModel):
    """The replica side of live migration (deployments/migration/source.py MigrationConfig; docs/MIGRATION.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent: int = Field(default=2, ge=1)  # K: migrations at once per replica, each way
    max_stages: int = Field(default=4, ge=1)  # KV copies while the request decodes, before the pause
    min_stage_tokens: int = Field(default=8, ge=1)  # fewer new tokens than this: pause and copy the tail
    growth_margin_tokens: int = Field(default=64, ge=0)  # the destination reserves this much growth
    call_timeout_s: float = Field(default=10.0, gt=0)  # one call to the destination
    timeout_s: float = Field(default=60.0, gt=0)  # watchdog for a whole migration
    initial_bandwidth_bytes_per_s: float = Field(default=200e6, gt=0)  # until a transfer is measured
    # How KV moves: Ray's object store (call arguments), or torch.distributed send/recv between the two
    # replicas (gloo on CPU, NCCL on GPU). auto: torch_distributed, measured 1.5-4.9x faster on CPU
    # (python -m loadtest.bench.transport); ray_object_store where replicas cannot open TCP ports to each other.
    transport: Literal["auto", "ray_object_store", "torch_distributed"] = "auto"

    def to_config(self):
        from deployments.migration.config import MigrationConfig

        return MigrationConfig(**self.model_dump(exclude={"transport"}))

    def resolved_transport(self) -> str:
        return "torch_distributed" if self.transport == "auto" else self.transport


class PlacementArgs(BaseModel):
    """Where replicas go on a multi-node cluster (deployments/cluster/placement.py; docs/MULTINODE.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spread_replicas: bool = False  # at most one replica per node (Serve's max_replicas_per_node: 1)
    max_replicas_per_node: int | None = Field(default=None, ge=1)  # a looser limit; wins over spread_replicas


class ParameterDroppingArgs(BaseModel):
    """KunServe parameter dropping (docs/KUNSERVE.md): under a KV spike, pairs of replicas drop complementary
    layers' weights and serve as a two-stage pipeline. `enabled` keeps a host copy of each layer's weights
    (host RAM equal to the model's layers) so dropped layers come back by copy; the plan is
    deployments/cluster/drop_plan.py."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    high_watermark: float = Field(default=0.9, gt=0, le=1.5)  # KV demand / capacity that counts as a spike
    restore_watermark: float = Field(default=0.6, gt=0, lt=1.5)  # restore once demand fits under this, restored
    max_drop_fraction: float = Field(default=0.5, gt=0, le=0.5)  # of a replica's layers (a pair keeps a full copy)
    drop_after_s: float = Field(default=1.0, ge=0)  # hysteresis before dropping
    restore_after_s: float = Field(default=5.0, ge=0)  # hysteresis before restoring
    peer_hang_s: float = Field(default=3.0, gt=0.5)  # a paired replica silent this long is lost (heartbeat)

    def plan_options(self) -> dict:
        """The drop plan's options (`DroppingConfig`'s fields; `peer_hang_s` is the replicas' own)."""
        return self.model_dump(exclude={"peer_hang_s"})

    def to_config(self):
        from deployments.cluster.drop_plan import DroppingConfig

        return DroppingConfig(**self.plan_options())


class AppArgs(BaseModel):
    """Engine knobs left at None take EngineConfig's default, so the engine owns its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    # What to serve.
    model: str | None = None  # None: smollm2-135m; embedded smollm2-135m | gemma3-270m, an HF directory or .gguf
    # Several models from one replica's pool (instead of `model`): e.g. [smollm2-135m, gemma3-270m]. Their
    # weights, KV (paged, Jenga's LCM allocator) and activations share one ElasticPool; the request's `model`
    # field picks one (the first is the default); no tensor parallelism, migration or parameter dropping.
    models: list[str] | None = Field(default=None, min_length=2)
    served_model_name: str | None = None  # the name clients send; None: the engine's model name
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if torch sees a GPU, else cpu
    # Memory: one elastic pool per device (per rank), host RAM as its overflow. Bytes or "1GiB".
    device_memory: int | None = None
    host_buffer: int | None = None
    pool_policy: Literal["elastic", "static"] | None = None
    preemption_mode: Literal["auto", "swap", "recompute"] | None = None
    # Parallelism and Ray resources.
    tensor_parallel_size: int = Field(default=1, ge=1)
    cpus_per_rank: float = Field(default=1.0, gt=0)  # Ray CPUs per rank (replica + each TP worker)
    num_threads: int | None = Field(default=None, ge=1)  # torch threads per rank; None: from cpus_per_rank
    placement: PlacementArgs = Field(default_factory=PlacementArgs)
    # The network interface of process groups between nodes (migration KV channels); None: the
    # ELASTIC_GLOO_IFNAME environment variable on the replica's node, else the node's address as Ray reports it.
    network_interface: str | None = None
    # Scheduler limits and SLO targets.
    max_model_len: int | None = Field(default=None, ge=1)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    max_num_waiting: int | None = Field(default=None, ge=0)
    enable_prefix_caching: bool | None = None
    ttft_slo_ms: float | None = Field(default=None, gt=0)
    tpot_slo_ms: float | None = Field(default=None, gt=0)
    priority_scale: float | None = Field(default=None, ge=1)  # class targets = targets * scale ** priority
    # LayerKV: layerwise admits prompts whose whole KV does not fit with top layers on the host (docs/LAYERKV.md)
    kv_offload: Literal["none", "layerwise"] | None = None
    stall_timeout_s: float | None = Field(default=None, gt=0)  # health fails when one engine step runs longer
    engine_options: dict[str, Any] = Field(default_factory=dict)  # any other EngineConfig field
    # HTTP.
    default_sampling: dict[str, Any] = Field(default_factory=dict)  # e.g. the model card's temperature/top_p
    api_key: str | None = Field(default=None, repr=False)  # set: /v1/* needs "Authorization: Bearer <key>"
    max_body_bytes: int = 4 << 20  # larger request bodies get 413 while being read; bytes or "4MiB"
    # Cluster controller.
    controller_name: str = "elastic-serve-controller"
    controller_namespace: str = "elastic-serve"
    telemetry_period_s: float = Field(default=0.5, gt=0, le=0.5)
    migration_policy: str = "none"  # none | balance | balance+pack (deployments/migration/policy.py)
    migration_policy_options: dict[str, Any] = Field(default_factory=dict)  # e.g. high_watermark, pack_budget
    migration: MigrationArgs = Field(default_factory=MigrationArgs)
    parameter_dropping: ParameterDroppingArgs = Field(default_factory=ParameterDroppingArgs)
    # Extra Serve deployment options for build_app (num_replicas, ...); the YAML's `deployments:` wins.
    deployment_options: dict[str, Any] = Field(default_factory=dict)
    # Another engine behind the same HTTP layer ("module:callable"; tests use a fake engine).
    engine_factory: str | None = None
    engine_factory_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_way_to_name_models(self):
        if self.models is None:
            return self
        if self.model is not None or self.served_model_name is not None:
            raise ValueError("models: serves each model under its own name; leave model and served_model_name out")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models: a model is listed twice: {self.models}")
        if self.tensor_parallel_size != 1 or self.parameter_dropping.enabled:
            raise ValueError("models: several models in one pool need tensor_parallel_size 1 and no parameter dropping")
        return self

    @field_validator("device_memory", "host_buffer", "max_body_bytes", mode="before")
    @classmethod
    def _size(cls, value):
        return None if value is None else parse_bytes(value)

    @field_validator("default_sampling")
    @classmethod
    def _known_sampling(cls, value):
        from deployments.ingress.protocol import DEFAULTABLE_SAMPLING

        unknown = sorted(set(value) - DEFAULTABLE_SAMPLING)
        if unknown:
            raise ValueError(f"default_sampling: unknown knobs {unknown}; known: {sorted(DEFAULTABLE_SAMPLING)}")
        return value

    @field_validator("engine_options")
    @classmethod
    def _stream_pacing(cls, value):
        # EngineConfig checks every field in the replica; this one is checked here too, so that a bad pace
        # fails `serve run` at once (the streams' chunks a second: None or > 0, engine/stream_pacer.py)
        rate = value.get("stream_chunks_per_s")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
            raise ValueError(f"engine_options: stream_chunks_per_s must be null or a number > 0, got {rate!r}")
        return value

    @field_validator("api_key")
    @classmethod
    def _non_empty_key(cls, value):
        if value is not None and not value.strip():
            raise ValueError("api_key must not be empty (leave it out to disable authentication)")
        return value

    def threads_per_rank(self) -> int:
        if self.num_threads is not None:
            return self.num_threads
        return max(1, round(self.cpus_per_rank))

    def to_engine_config(self, device: str | None = None):
        """EngineConfig for this replica; `device` overrides the resolution of "auto" (e.g. for checks)."""
        from engine.config import EngineConfig

        known = {field.name for field in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(self.engine_options) - known)
        if unknown:
            raise ValueError(f"engine_options: unknown EngineConfig fields {unknown}")
        values = {
            "model": self.model, "dtype": self.dtype, "device_memory_bytes": self.device_memory,
            "host_buffer_bytes": self.host_buffer, "pool_policy": self.pool_policy,
            "preemption_mode": self.preemption_mode, "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_waiting": self.max_num_waiting, "enable_prefix_caching": self.enable_prefix_caching,
            "ttft_slo_ms": self.ttft_slo_ms, "tpot_slo_ms": self.tpot_slo_ms,
            "priority_scale": self.priority_scale, "kv_offload": self.kv_offload,
            "stall_timeout_s": self.stall_timeout_s,
        }
        kwargs = {name: value for name, value in values.items() if value is not None}
        if self.parameter_dropping.enabled:
            kwargs["enable_parameter_dropping"] = True
        kwargs.update(self.engine_options)
        kwargs.update(device=device or resolve_device(self.device), num_threads=self.threads_per_rank(),
                      tensor_parallel_size=self.tensor_parallel_size)
        return EngineConfig(**kwargs)

    def to_engine_configs(self, device: str | None = None) -> list:
        """One EngineConfig per served model: `models:` (each on the `paged` layout unless engine_options
        says otherwise, which the EngineGroup then refuses), or the single `model`."""
        config = self.to_engine_config(device)
        if self.models is None:
            return [config]
        layout = self.engine_options.get("kv_layout", "paged")
        return [dataclasses.replace(config, model=model, kv_layout=layout) for model in self.models]


def app_args_in(config: dict[str, Any]) -> list[AppArgs]:
    """The validated `args` of each application a Serve config (serve_config.yaml, parsed) builds with
    deployments.app:build_app, in order; other applications are not ours to read."""
    return [AppArgs.model_validate(app.get("args") or {}) for app in config.get("applications", [])
            if app.get("import_path", "").startswith("deployments.app:")]
