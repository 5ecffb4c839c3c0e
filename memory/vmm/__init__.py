"""VMM backends: reserve virtual ranges and map physical chunks into them (host | cuda | sim)."""

from memory.vmm.base import BackendClosed, BackendUnavailable, PhysicalChunk, VmmBackend
from memory.vmm.registry import available_backends, create_backend, register_backend

__all__ = [
    "BackendClosed",
    "BackendUnavailable",
    "PhysicalChunk",
    "VmmBackend",
    "available_backends",
    "create_backend",
    "register_backend",
]
