"""Registry of KV layouts: `create_layout("contiguous", spec, backend, dtype)`.

A layout variant is a `KVLayout` subclass registered under its `name` (`kv_layout` in the engine
config). memory/ registers its own (`contiguous`, `paged`); a layer above registers its layouts
explicitly with `register_layout` before it asks for them (the packing simulator's `bookkeeping` layout:
loadtest/sim/replica.py), never as a side effect of being imported.
"""

from __future__ import annotations

import torch

from memory.kv.contiguous import ContiguousLayout
from memory.kv.layout import KVLayout
from memory.kv.paged import PagedLayout
from memory.kv.spec import KVCacheSpec
from memory.vmm.base import VmmBackend

_LAYOUTS: dict[str, type[KVLayout]] = {}


def register_layout(layout: type[KVLayout], *, replace: bool = False) -> None:
    """Make `create_layout(layout.name, ...)` build `layout`. Registering the same class again does nothing;
    another class under a taken name raises unless `replace`."""
    if not (isinstance(layout, type) and issubclass(layout, KVLayout)):
        raise TypeError(f"{layout!r} is not a KVLayout subclass")
    known = _LAYOUTS.get(layout.name)
    if known is not None and known is not layout and not replace:
        raise ValueError(f"KV layout {layout.name!r} is already registered ({known.__qualname__})")
    _LAYOUTS[layout.name] = layout


def available_layouts() -> tuple[str, ...]:
    return tuple(sorted(_LAYOUTS))


def layout_class(name: str) -> type[KVLayout]:
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise KeyError(f"unknown KV layout {name!r}; registered: {', '.join(available_layouts())}") from None


def create_layout(name: str, spec: KVCacheSpec, backend: VmmBackend, dtype: torch.dtype) -> KVLayout:
    return layout_class(name)(spec, backend, dtype)


register_layout(ContiguousLayout)
register_layout(PagedLayout)
