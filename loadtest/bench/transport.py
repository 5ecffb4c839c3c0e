"""Migration KV transports side by side: Ray's object store vs torch.distributed (gloo) point-to-point.

Two Ray actors (a source and a destination, as two replicas would be) move KV stages shaped like the
embedded SmolLM2's (30 layers x K/V x 3 KV heads x 64, fp32: 46 KiB per token). `ray_object_store` passes the
stage as a call argument (what `ServeHandlePeer.write_kv` does); `torch_distributed` sends it over the
pair's gloo group with only its header in the call (what `CollectivePeer.write_kv` does, through the same
`KVChannels`). Sizes and transports are interleaved, each timing the median of `--repeats`; the table shows
MB/s and the ratio.

    python -m loadtest.bench.transport [--tokens 64 512 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from deployments.migration.kv_channel import KVChannels
from engine.migration import KVStage

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64


def make_stage(num_tokens: int) -> KVStage:
    return KVStage(0, num_tokens, [(torch.randn(num_tokens, KV_HEADS, HEAD_DIM),
                                    torch.randn(num_tokens, KV_HEADS, HEAD_DIM)) for _ in range(LAYERS)])


class Destination:
    def __init__(self):
        self.channels = KVChannels("127.0.0.1", timeout_s=60.0)

    async def take(self, stage: KVStage) -> int:  # the object store path: the stage is the argument
        return stage.num_bytes

    async def join(self, source: str, address) -> None:
        await self.channels.join(source, address)

    async def receive(self, header, source: str) -> int:
        return (await self.channels.receive(source, header)).num_bytes


class Source:
    def __init__(self, destination):
        self.destination = destination
        self.channels = KVChannels("127.0.0.1", timeout_s=60.0)

    async def time_object_store(self, num_tokens: int) -> float:
        stage = make_stage(num_tokens)
        started = time.perf_counter()
        assert await self.destination.take.remote(stage) == stage.num_bytes
        return time.perf_counter() - started

    async def time_collective(self, num_tokens: int) -> float:
        stage = make_stage(num_tokens)

        async def join(address) -> None:
            await self.destination.join.remote("source", address)

        async def deliver(header) -> None:
            assert await self.destination.receive.remote(header, "source") == stage.num_bytes

        started = time.perf_counter()
        await self.channels.send("destination", stage, join, deliver)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    temp_dir = tempfile.mkdtemp(prefix="tb-", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": repo}})
    try:
        destination = ray.remote(num_cpus=0)(Destination).remote()
        source = ray.remote(num_cpus=0)(Source).remote(destination)
        ray.get(source.time_collective.remote(1))  # builds the group once, as the first migration would
        ray.get(source.time_object_store.remote(1))
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):
            for num_tokens in args.tokens:
                for name, method in (("object_store", source.time_object_store),
                                     ("torch_distributed", source.time_collective)):
                    times.setdefault((name, num_tokens), []).append(ray.get(method.remote(num_tokens)))
    finally:
        ray.shutdown()
    print(f"{'tokens':>7} {'MiB':>7} {'object store MB/s':>18} {'gloo p2p MB/s':>14} {'gloo / object store':>20}")
    for num_tokens in args.tokens:
        num_bytes = make_stage(num_tokens).num_bytes
        store, gloo = (statistics.median(times[(name, num_tokens)]) for name in ("object_store", "torch_distributed"))
        print(f"{num_tokens:>7} {num_bytes / 2**20:>7.1f} {num_bytes / store / 1e6:>18.0f} "
              f"{num_bytes / gloo / 1e6:>14.0f} {store / gloo:>19.2f}x")


if __name__ == "__main__":
    main()
