"""The linear backends by name: `create_linear("auto" | "torch" | "native" | "onednn", device)`.

A module of its own so that the backends (engine/model/linear.py, engine/model/onednn_linear.py) import the
interface and the registry imports the backends: one direction, no cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from engine.model.linear import NativeLinear, TorchLinear
from engine.model.onednn_linear import OneDnnLinear, onednn_available

logger = logging.getLogger(__name__)


def _native_or_torch() -> TorchLinear:
    try:
        return NativeLinear()
    except (RuntimeError, OSError) as error:
        logger.warning("native small-batch GEMM unavailable (%s); using torch.mm", error)
        return TorchLinear()


def _onednn(device: str = "cpu") -> TorchLinear:
    if device != "cpu":  # the packed bytes are CPU memory layouts: never for weights placed on a GPU
        raise ValueError(f"the onednn linear backend is for CPU weights, not {device!r}")
    return OneDnnLinear(fallback=_native_or_torch())


def _auto(device: str = "cpu") -> TorchLinear:
    if device != "cpu":  # the C kernels take CPU memory only: on a GPU, torch (cuBLAS) does every product
        return TorchLinear()
    return _onednn() if onednn_available() else _native_or_torch()


_LINEARS: dict[str, Callable[[str], TorchLinear]] = {"torch": lambda device="cpu": TorchLinear(),
                                                     "native": lambda device="cpu": NativeLinear(),
                                                     "onednn": _onednn, "auto": _auto}


def create_linear(name: str = "auto", device: str = "cpu") -> TorchLinear:
    """The backend `name` for weights placed on `device` ("cpu" | "cuda")."""
    try:
        factory = _LINEARS[name]
    except KeyError:
        raise ValueError(f"unknown linear backend {name!r}; known: {sorted(_LINEARS)}") from None
    return factory(device)
