"""CUDA VMM backend: the driver's virtual memory API through cuda-python (`cuda.bindings.driver`).

reserve = cuMemAddressReserve, create = cuMemCreate (pinned device memory), map = cuMemMap +
cuMemSetAccess (read/write for the device), unmap = cuMemUnmap, release = cuMemRelease, free =
cuMemAddressFree. Everything runs in PyTorch's primary context of the device (retained with
cuDevicePrimaryCtxRetain and made current before every call, since the driver's current context is
per thread). `as_tensor` hands the range to torch through `__cuda_array_interface__` (zero copy).

Unmapped pages are never left without backing: one scratch chunk of `granularity` bytes is
mapped at every unmapped granule of every reservation (on reserve and on unmap), so a stray read
of a padded slot reads scratch instead of faulting the whole context. Scratch is shared and
writable: whatever a stray write leaves there is garbage, so padded reads must be masked.
The backend synchronizes the device before unmapping, so no kernel still reads a page that goes.

cuda-python is imported lazily (it is the optional `gpu` extra); without it, without a driver or
without a visible GPU, constructing the backend raises `BackendUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from memory.vmm.base import BackendUnavailable, PhysicalChunk, VmmBackend


def _load_driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as error:
        raise BackendUnavailable(
            "the cuda backend needs cuda-python: pip install 'elastic-serve[gpu]'") from error
    try:
        (result,) = driver.cuInit(0)
    except Exception as error:  # cuda-python raises when the driver library itself is missing
        raise BackendUnavailable(f"the CUDA driver is not available: {error}") from error
    if result != driver.CUresult.CUDA_SUCCESS:
        raise BackendUnavailable(f"cuInit failed: {_error_name(driver, result)}")
    return driver


def _error_name(driver: Any, result: Any) -> str:
    error, name = driver.cuGetErrorName(result)
    return name.decode() if error == driver.CUresult.CUDA_SUCCESS else str(result)


class _CudaArray:
    """The minimal `__cuda_array_interface__` (v3) of a 1-D uint8 device range."""

    def __init__(self, address: int, num_bytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,), "typestr": "|u1", "data": (address, False), "strides": None,
            "version": 3, "stream": None}


class TorchCuda:
    """What the backend needs from torch.cuda (a seam so tests can pass a fake with a fake driver)."""

    def is_available(self) -> bool:
        """torch.cuda.is_available()"""
        return torch.cuda.is_available()

    def current_device(self) -> int:
        """torch.cuda.current_device()"""
        return torch.cuda.current_device()

    def init(self) -> None:
        """torch.cuda.init()"""
        torch.cuda.init()

    def synchronize(self, device: torch.device) -> None:
        """torch.cuda.synchronize(device)"""
        torch.cuda.synchronize(device)

    def as_tensor(self, address: int, num_bytes: int, device: torch.device) -> torch.Tensor:
        """Zero-copy uint8 tensor over device memory via __cuda_array_interface__."""
        return torch.as_tensor(_CudaArray(address, num_bytes), device=device)


class CudaBackend(VmmBackend):
    """VMM on one NVIDIA GPU. `granularity` defaults to the driver's minimum (2 MiB on current
    GPUs) and must be a multiple of it. `driver` (the cuda.bindings.driver module) and `torch_cuda`
    default to the real ones; tests pass fakes."""

    name = "cuda"

    def __init__(self, device: int | str | torch.device = "cuda", granularity: int | None = None, *,
                 driver: Any = None, torch_cuda: TorchCuda | None = None) -> None:
        driver = _load_driver() if driver is None else driver
        self._torch_cuda = TorchCuda() if torch_cuda is None else torch_cuda
        if not self._torch_cuda.is_available():
            raise BackendUnavailable("the cuda backend needs a GPU visible to torch")
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"the cuda backend needs a cuda device, got {device}")
        index = self._torch_cuda.current_device() if device.index is None else device.index
        self._torch_cuda.init()
        self._driver = driver
        self._cu_device = self._call(driver.cuDeviceGet, index)
        self._context = self._call(driver.cuDevicePrimaryCtxRetain, self._cu_device)  # torch's context
        self._call(driver.cuCtxSetCurrent, self._context)
        self._prop = driver.CUmemAllocationProp()
        self._prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = index
        minimum = self._call(driver.cuMemGetAllocationGranularity, self._prop,
                             driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)
        granularity = int(minimum) if granularity is None else int(granularity)
        if granularity % int(minimum):
            raise ValueError(f"cuda granularity {granularity} is not a multiple of the driver's {minimum}")
        super().__init__(torch.device("cuda", index), granularity)
        self._access = driver.CUmemAccessDesc()
        self._access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = index
        self._access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._scratch = self._call(driver.cuMemCreate, self.granularity, self._prop, 0)
        self.num_allocated_bytes = 0

    # ---- driver calls --------------------------------------------------------------------------
    def _call(self, function: Any, *args: Any) -> Any:
        """Call a driver function, raise on error, return its result value(s) (None if none)."""
        result, *values = function(*args)
        if result != self._driver.CUresult.CUDA_SUCCESS:
            name = _error_name(self._driver, result)
            if result == self._driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
                raise MemoryError(f"{function.__name__}: {name}")
            raise RuntimeError(f"{function.__name__}{args[:2]}: {name}")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    def _current(self) -> Any:
        self._call(self._driver.cuCtxSetCurrent, self._context)
        return self._driver

    def _pointer(self, address: int) -> Any:
        return self._driver.CUdeviceptr(address)

    def _map_scratch(self, address: int, num_bytes: int) -> None:
        driver = self._driver
        for place in range(address, address + num_bytes, self.granularity):
            self._call(driver.cuMemMap, self._pointer(place), self.granularity, 0, self._scratch, 0)
        self._call(driver.cuMemSetAccess, self._pointer(address), num_bytes, [self._access], 1)

    def _unmap_granules(self, address: int, num_bytes: int) -> None:
        for place in range(address, address + num_bytes, self.granularity):
            self._call(self._driver.cuMemUnmap, self._pointer(place), self.granularity)

    # ---- primitives ----------------------------------------------------------------------------
    def _raw_reserve(self, num_bytes: int) -> int:
        driver = self._current()
        pointer = self._call(driver.cuMemAddressReserve, num_bytes, self.granularity, self._pointer(0), 0)
        address = int(pointer)
        self._map_scratch(address, num_bytes)
        return address

    def _raw_free_reservation(self, address: int, num_bytes: int) -> None:
        driver = self._current()
        self.synchronize()
        self._unmap_granules(address, num_bytes)  # all scratch: every page is unmapped by now
        self._call(driver.cuMemAddressFree, self._pointer(address), num_bytes)

    def _raw_create(self, num_bytes: int) -> tuple[int, object]:
        driver = self._current()
        handle = self._call(driver.cuMemCreate, num_bytes, self._prop, 0)
        self.num_allocated_bytes += num_bytes
        return 0, handle

    def _raw_map(self, address: int, chunks: Sequence[PhysicalChunk]) -> None:
        driver = self._current()
        total = sum(chunk.num_bytes for chunk in chunks)
        self._unmap_granules(address, total)  # scratch out
        place = address
        for chunk in chunks:
            self._call(driver.cuMemMap, self._pointer(place), chunk.num_bytes, 0, chunk.handle, 0)
            place += chunk.num_bytes
        self._call(driver.cuMemSetAccess, self._pointer(address), total, [self._access], 1)

    def _raw_unmap(self, address: int, num_bytes: int, mappings: Sequence[tuple[int, PhysicalChunk]]) -> None:
        driver = self._current()
        for place, chunk in mappings:
            self._call(driver.cuMemUnmap, self._pointer(place), chunk.num_bytes)
            self._map_scratch(place, chunk.num_bytes)

    def _raw_release(self, chunk: PhysicalChunk) -> None:
        driver = self._current()
        self._call(driver.cuMemRelease, chunk.handle)
        self.num_allocated_bytes -= chunk.num_bytes

    def _raw_close(self) -> None:
        driver = self._current()
        self._call(driver.cuMemRelease, self._scratch)
        self._call(driver.cuDevicePrimaryCtxRelease, self._cu_device)

    def synchronize(self) -> None:
        """Wait for every stream of the device (kernels may still read pages about to go)."""
        self._torch_cuda.synchronize(self.device)

    def as_tensor(self, address: int, num_bytes: int) -> torch.Tensor:
        """Zero-copy uint8 CUDA tensor over [address, address+num_bytes) (data_ptr() == address)."""
        self._check_open()
        self._find_reservation(address, num_bytes)
        return self._torch_cuda.as_tensor(address, num_bytes, self.device)

    def physical_bytes(self) -> int:
        """Device bytes held by live chunks (the scratch chunk not counted)."""
        return self.num_allocated_bytes
