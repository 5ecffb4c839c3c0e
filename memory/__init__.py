"""One device's memory: VMM backends, virtual tensors, the elastic pool and the host buffer.

Public API: `ElasticPool`, `PoolTelemetry`, `PoolExhausted`, `VirtualTensor`, `HostBuffer`,
`create_backend` / `register_backend` (VMM backends "host", "cuda", "sim"), `create_policy` /
`register_policy` (pool policies "elastic", "static").
"""

from memory.host_buffer import HostBuffer, HostBufferFull
from memory.policies import ElasticPolicy, PoolPolicy, StaticPolicy, create_policy, register_policy
from memory.pool import ElasticPool, PoolExhausted, PoolTelemetry
from memory.virtual_tensor import VirtualTensor
from memory.vmm import (
    BackendClosed,
    BackendUnavailable,
    PhysicalChunk,
    VmmBackend,
    available_backends,
    create_backend,
    register_backend,
)

__all__ = [
    "BackendClosed",
    "BackendUnavailable",
    "ElasticPolicy",
    "ElasticPool",
    "HostBuffer",
    "HostBufferFull",
    "PhysicalChunk",
    "PoolExhausted",
    "PoolPolicy",
    "PoolTelemetry",
    "StaticPolicy",
    "VirtualTensor",
    "VmmBackend",
    "available_backends",
    "create_backend",
    "create_policy",
    "register_backend",
    "register_policy",
]
