"""`build_app(args)`: the application `serve run serve_config.yaml` starts (its `import_path`).

Validates the YAML `args` (AppArgs), starts the cluster controller, and sizes the LLMServer replicas'
Ray resources: `cpus_per_rank` CPUs for the replica, and with tensor parallelism one STRICT_PACK placement-group
bundle per rank (the replica is rank 0 in bundle 0; its workers take bundles 1..N-1), and with
`placement.spread_replicas` at most one replica per node. Settings under
`deployments:` in the YAML (num_replicas, max_ongoing_requests, request_router_config) override these.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.serve import Application

from deployments.args import AppArgs
from deployments.cluster.controller import controller_options, create_migration_policy, get_or_create_controller
from deployments.cluster.placement import replica_placement_options
from deployments.server import LLMServer


def uses_gpu(args: AppArgs) -> bool:
    if args.device != "auto":
        return args.device == "cuda"
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def deployment_options(args: AppArgs) -> dict[str, Any]:
    gpus = 1 if uses_gpu(args) else 0
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": args.cpus_per_rank, "num_gpus": gpus}}
    if args.tensor_parallel_size > 1:
        bundle = {"CPU": args.cpus_per_rank, **({"GPU": gpus} if gpus else {})}
        options["placement_group_bundles"] = [dict(bundle) for _ in range(args.tensor_parallel_size)]
        options["placement_group_strategy"] = "STRICT_PACK"
    options.update(replica_placement_options(args.placement.spread_replicas, args.placement.max_replicas_per_node,
                                             args.tensor_parallel_size))
    options.update(args.deployment_options)
    if args.tensor_parallel_size > 1 and options.get("placement_group_strategy") != "STRICT_PACK":
        # The ranks rendezvous through a file and talk over loopback: they must share a node.
        raise ValueError("tensor_parallel_size > 1 needs placement_group_strategy STRICT_PACK")
    return options


def build_app(args: dict[str, Any] | None = None) -> Application:
    app_args = AppArgs.model_validate(args or {})
    # Fail here, in `serve run`'s output, rather than in every replica's constructor. (EngineConfig's own
    # checks run in the replicas: importing the engine here would cost `serve run` ~2 s of torch import.)
    create_migration_policy(app_args.migration_policy, app_args.migration_policy_options)
    app_args.migration.to_config()
    if ray.is_initialized():
        get_or_create_controller(app_args.controller_name, app_args.controller_namespace,
                                 app_args.migration_policy, **controller_options(app_args))
    return LLMServer.options(**deployment_options(app_args)).bind(app_args.model_dump(mode="json"))
