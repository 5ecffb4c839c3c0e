"""`python -m deployments.launch serve_config.yaml`: `serve run` with a graceful stop (what `make serve` runs).

`serve run` answers SIGINT with `serve.shutdown()`, whose first step kills Serve's HTTP proxies
(ProxyStateManager.shutdown -> ray.kill): every stream in flight is cut within a fraction of a second,
whatever the deployment's graceful_shutdown_timeout_s. This launcher deploys the same YAML the same way
(ServeDeploySchema -> deploy_apps), installs the proxy guard (deployments/ingress/proxy_guard.py), and on
SIGINT or SIGTERM first drains: it tells each application's cluster controller to order a drain (replicas
refuse new requests with 503 + Retry-After, let running ones finish, and abort what is left shortly before
the deadline so those clients get an error event and `[DONE]`), waits until no replica has work or the
deadline passed, and only then calls `serve.shutdown()`. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from deployments.ingress.proxy_guard import CALLBACK_ENV, CALLBACK_PATH

DEFAULT_GRACE_S = 20.0  # LLMServer's graceful_shutdown_timeout_s


def grace_period_s(config: dict[str, Any]) -> float:
    """The longest graceful_shutdown_timeout_s of the YAML's deployments (LLMServer's default otherwise)."""
    values = [deployment.get("graceful_shutdown_timeout_s", DEFAULT_GRACE_S)
              for app in config.get("applications", []) for deployment in app.get("deployments", [])]
    return max(values, default=DEFAULT_GRACE_S)


def controllers(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, namespace) of each application's cluster controller, from its validated args."""
    from deployments.args import app_args_in

    return [(args.controller_name, args.controller_namespace) for args in app_args_in(config)]


def has_work(view: dict[str, Any]) -> bool:
    return any(entry["stats"].get("num_running", 0) + entry["stats"].get("num_waiting", 0) > 0
               for entry in view["replicas"].values() if not entry["is_stale"])


def drain(config: dict[str, Any], grace_s: float, log=print) -> None:
    """Orders every controller's replicas to drain within `grace_s`, and waits for them."""
    import ray

    handles = []
    for name, namespace in controllers(config):
        try:
            handles.append(ray.get_actor(name, namespace=namespace))
        except ValueError:
            continue
    if not handles:
        return
    deadline = max(ray.get([handle.begin_shutdown.remote(grace_s) for handle in handles]))
    log(f"draining: replicas refuse new requests; running ones have {grace_s:.0f} s")
    time.sleep(1.0)  # one telemetry period for the order to reach every replica
    while time.time() < deadline + 1.0:
        views = ray.get([handle.cluster_view.remote() for handle in handles])
        if not any(has_work(view) for view in views):
            log("drained: no request in flight")
            return
        time.sleep(0.25)
    log("drain deadline passed")


CAP_SYS_NICE = 23  # linux/capability.h


def can_raise_priority(status_path: str = "/proc/self/status") -> bool:
    """Whether this process (and the Ray workers it starts) may lower nice values: CAP_SYS_NICE in its effective
    set. Then a replica's engine loop takes nice -10 itself and Ray's other workers are best left at Ray's 15:
    served, the whole cluster's workers at 0 measured c=1 41.0-46.5 vs 49.1-50.5 and c=32 402-403 vs 421-427
    out tok/s (docs/SPEED.md, 2026-12-06 (night))."""
    try:
        for line in Path(status_path).read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a new local one); 'local': a new one")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs of a new local cluster")
    options = parser.parse_args(argv)
    import yaml

    config = yaml.safe_load(options.config.read_text())
    os.environ.setdefault(CALLBACK_ENV, CALLBACK_PATH)  # inherited by the proxies Ray starts
    if not can_raise_priority():
        # the engine loop cannot lower its nice value below Ray's 15 for its workers: start them at 0
        # (EngineConfig.engine_thread_nice explains why); with CAP_SYS_NICE it goes to -10 and the rest stay at 15
        os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api  # what `serve run` itself uses to deploy a YAML
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    ray.init(address=options.address, namespace="serve",
             **({"num_cpus": options.num_cpus} if options.num_cpus is not None else {}))
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location,
                                   grpc_options=gRPCOptions(**schema.grpc_options.model_dump()))
    client.deploy_apps(schema, _blocking=False)
    print(f"deployed {options.config}; SIGINT or SIGTERM drains and stops", flush=True)

    stop = threading.Event()
    signals = []

    def on_signal(number, _frame) -> None:
        signals.append(number)
        if len(signals) > 1:
            raise KeyboardInterrupt  # a second signal: stop without draining
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop.wait(1.0):
            pass
        drain(config, grace_period_s(config), log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("second signal: stopping now", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
