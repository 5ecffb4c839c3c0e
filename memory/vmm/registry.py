"""Registry of VMM backends: `create_backend("host" | "cuda" | "sim", **kwargs)`.

Backends are constructed by factories looked up by name, so callers pick a variant with a string
from configuration instead of branching. The CUDA backend's module (and cuda-python) is imported
only when "cuda" is actually created, so CPU machines never need it.
"""

from __future__ import annotations

from collections.abc import Callable

from memory.vmm.base import VmmBackend

BackendFactory = Callable[..., VmmBackend]

_FACTORIES: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make `create_backend(name, **kw)` call `factory(**kw)`. Refuses to overwrite unless `replace`."""
    if name in _FACTORIES and not replace:
        raise ValueError(f"backend {name!r} is already registered")
    _FACTORIES[name] = factory


def available_backends() -> tuple[str, ...]:
    """Registered backend names (registered, not necessarily usable on this machine)."""
    return tuple(sorted(_FACTORIES))


def create_backend(name: str, **kwargs: object) -> VmmBackend:
    """Construct the backend registered as `name`. Raises KeyError for an unknown name and
    `BackendUnavailable` when the backend cannot run here (e.g. "cuda" without a driver)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        known = ", ".join(available_backends())
        raise KeyError(f"unknown VMM backend {name!r}; registered: {known}") from None
    return factory(**kwargs)


def _host(**kwargs: object) -> VmmBackend:
    from memory.vmm.host import HostBackend

    return HostBackend(**kwargs)


def _cuda(**kwargs: object) -> VmmBackend:
    from memory.vmm.cuda import CudaBackend

    return CudaBackend(**kwargs)


def _sim(**kwargs: object) -> VmmBackend:
    from memory.vmm.sim import SimBackend

    return SimBackend(**kwargs)


register_backend("host", _host)
register_backend("cuda", _cuda)
register_backend("sim", _sim)
