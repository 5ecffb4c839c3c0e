"""The CUDA VMM backend. GPU tests carry the `gpu` marker and skip without a GPU or cuda-python."""

from __future__ import annotations

import enum
import importlib.util
import types

import pytest
import torch
import torch.nn.functional as F

from memory import BackendUnavailable, ElasticPool, VirtualTensor, create_backend
from memory.vmm.cuda import CudaBackend

HAS_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None and (
    importlib.util.find_spec("cuda.bindings") is not None)
HAS_GPU = torch.cuda.is_available() and HAS_CUDA_PYTHON



@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_without_a_gpu_the_cuda_backend_refuses_clearly():
    with pytest.raises(BackendUnavailable, match="cuda-python|driver|GPU"):
        create_backend("cuda")


@pytest.fixture
def cuda():
    backend = create_backend("cuda")
    yield backend
    backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU and cuda-python")
def test_map_unmap_alias_move_on_the_device(cuda):
    granularity = cuda.granularity
    assert granularity % (2 << 20) == 0  # the driver's minimum on every current NVIDIA GPU
    vt = VirtualTensor(cuda, (4, granularity // 4), torch.float32, granularity)
    assert vt.tensor.device.type == "cuda" and vt.tensor.data_ptr() == vt.address
    unmapped = vt.tensor[1].clone()  # scratch: reads without faulting
    assert unmapped.shape == (granularity // 4,)
    chunk = cuda.create_chunk(granularity)
    vt.map_page(0, chunk)
    vt.tensor[0] = 2.5
    vt.map_page(3, chunk)  # alias
    assert torch.equal(vt.tensor[3], vt.tensor[0]) and chunk.num_mappings == 2
    vt.unmap_page(0)
    vt.move_page(3, 2)
    assert float(vt.tensor[2].min()) == 2.5 and float(vt.tensor[2].max()) == 2.5
    assert vt.tensor.data_ptr() == vt.address
    vt.unmap_page(2)
    cuda.release_chunk(chunk)
    assert cuda.physical_bytes() == 0
    with pytest.raises(ValueError, match="already released"):
        cuda.release_chunk(chunk)
    vt.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU and cuda-python")
def test_torch_ops_on_device_views_match_plain_tensors(cuda):
    granularity = cuda.granularity
    pool = ElasticPool(cuda, 16 * granularity, granularity)
    pool.register("kv")
    k = VirtualTensor(cuda, (4, 256, 2, 64), torch.float16, granularity)
    v = VirtualTensor(cuda, (4, 256, 2, 64), torch.float16, granularity)
    k.map_pages(0, pool.inflate("kv", k.num_pages))
    v.map_pages(0, pool.inflate("kv", v.num_pages))
    plain_k = torch.randn(4, 256, 2, 64, device="cuda", dtype=torch.float16)
    plain_v = torch.randn(4, 256, 2, 64, device="cuda", dtype=torch.float16)
    k.tensor.copy_(plain_k)
    v.tensor.copy_(plain_v)
    q = torch.randn(3, 2, 1, 64, device="cuda", dtype=torch.float16)
    sdpa = F.scaled_dot_product_attention
    got = sdpa(q, k.tensor[:3, :100].transpose(1, 2), v.tensor[:3, :100].transpose(1, 2))
    want = sdpa(q, plain_k[:3, :100].transpose(1, 2), plain_v[:3, :100].transpose(1, 2))
    assert torch.equal(got, want)
    flat = k.tensor.view(-1, 64)
    assert torch.equal(flat @ flat[:64].T, plain_k.view(-1, 64) @ plain_k.view(-1, 64)[:64].T)
    index = torch.tensor([3, 0, 2], device="cuda")
    assert torch.equal(k.tensor.index_select(0, index), plain_k.index_select(0, index))
    for tensor in (k, v):
        pool.deflate("kv", tensor.unmap_pages(0, tensor.num_pages))
        tensor.close()
    num_alive = pool.num_alive
    assert num_alive == k.num_pages + v.num_pages and pool.trim() == num_alive
    assert cuda.physical_bytes() == 0
    pool.close()


# ---- the CUDA backend's driver protocol, checked on any machine against a strict fake driver -----

G = 2 << 20


class FakeDriver:
    """A strict stand-in for cuda.bindings.driver: it models reservations, physical handles,
    mappings and access rights, and fails calls the real driver would fail."""

    class CUresult(enum.IntEnum):
        CUDA_SUCCESS = 0
        CUDA_ERROR_INVALID_VALUE = 1
        CUDA_ERROR_OUT_OF_MEMORY = 2

    class CUmemAllocationType(enum.IntEnum):
        CU_MEM_ALLOCATION_TYPE_PINNED = 1

    class CUmemLocationType(enum.IntEnum):
        CU_MEM_LOCATION_TYPE_DEVICE = 1

    class CUmemAccess_flags(enum.IntEnum):  # noqa: N801 - the driver's spelling
        CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3

    class CUmemAllocationGranularity_flags(enum.IntEnum):  # noqa: N801
        CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0

    class CUdeviceptr(int):
        pass

    @staticmethod
    def CUmemAllocationProp():  # noqa: N802
        return types.SimpleNamespace(type=None, location=types.SimpleNamespace(type=None, id=None))

    @staticmethod
    def CUmemAccessDesc():  # noqa: N802
        return types.SimpleNamespace(flags=None, location=types.SimpleNamespace(type=None, id=None))

    def __init__(self, capacity_bytes: int = 1 << 40) -> None:
        self.capacity_bytes = capacity_bytes
        self.reservations: dict[int, int] = {}
        self.handles: dict[int, int] = {}  # live handle -> size
        self.mappings: dict[int, tuple[int, int]] = {}  # address -> (size, handle)
        self.accessible: set[int] = set()  # granule addresses with read/write access
        self.calls: list[str] = []
        self.context_refs = 0
        self._next_address, self._next_handle = 1 << 40, 1

    def _ok(self, *values):
        return (self.CUresult.CUDA_SUCCESS, *values)

    def _bad(self, why: str):
        self.calls.append(f"FAILED {why}")
        return (self.CUresult.CUDA_ERROR_INVALID_VALUE,)

    def cuGetErrorName(self, result):  # noqa: N802
        return self._ok(self.CUresult(result).name.encode())

    def cuDeviceGet(self, index):  # noqa: N802
        return self._ok(f"device{index}")

    def cuDevicePrimaryCtxRetain(self, device):  # noqa: N802
        self.context_refs += 1
        return self._ok("primary")

    def cuDevicePrimaryCtxRelease(self, device):  # noqa: N802
        self.context_refs -= 1
        return self._ok()

    def cuCtxSetCurrent(self, context):  # noqa: N802
        return self._ok() if context == "primary" else self._bad("context")

    def cuMemGetAllocationGranularity(self, prop, option):  # noqa: N802
        return self._ok(G)

    def cuMemAddressReserve(self, size, alignment, address, flags):  # noqa: N802
        if size % G or int(address) != 0:
            return self._bad("reserve")
        start, self._next_address = self._next_address, self._next_address + size + G
        self.reservations[start] = size
        return self._ok(self.CUdeviceptr(start))

    def cuMemAddressFree(self, pointer, size):  # noqa: N802
        start = int(pointer)
        if self.reservations.get(start) != size or any(start <= a < start + size for a in self.mappings):
            return self._bad("address free")
        del self.reservations[start]
        return self._ok()

    def cuMemCreate(self, size, prop, flags):  # noqa: N802
        if prop.type != 1 or prop.location.type != 1 or size % G:
            return self._bad("create")
        if sum(self.handles.values()) + size > self.capacity_bytes:
            return (self.CUresult.CUDA_ERROR_OUT_OF_MEMORY,)
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        self.handles[handle] = size
        return self._ok(handle)

    def cuMemRelease(self, handle):  # noqa: N802
        return self._ok() if self.handles.pop(handle, None) is not None else self._bad("release")

    def cuMemMap(self, pointer, size, offset, handle, flags):  # noqa: N802
        start = int(pointer)
        inside = any(r <= start and start + size <= r + n for r, n in self.reservations.items())
        overlaps = any(a < start + size and start < a + n for a, (n, _) in self.mappings.items())
        if not inside or overlaps or handle not in self.handles or offset + size > self.handles[handle]:
            return self._bad(f"map {start:#x}")
        self.mappings[start] = (size, handle)
        return self._ok()

    def cuMemUnmap(self, pointer, size):  # noqa: N802
        start = int(pointer)
        if self.mappings.get(start, (None,))[0] != size:
            return self._bad(f"unmap {start:#x}")
        del self.mappings[start]
        self.accessible -= set(range(start, start + size, G))
        return self._ok()

    def cuMemSetAccess(self, pointer, size, descriptors, count):  # noqa: N802
        granules = set(range(int(pointer), int(pointer) + size, G))
        if count != 1 or descriptors[0].flags != 3 or not granules <= self.mapped_granules():
            return self._bad("set access")
        self.accessible |= granules
        return self._ok()

    def mapped_granules(self) -> set[int]:
        return {g for a, (n, _) in self.mappings.items() for g in range(a, a + n, G)}

    def handle_at(self, address: int) -> int | None:
        for start, (size, handle) in self.mappings.items():
            if start <= address < start + size:
                return handle
        return None


class FakeTorchCuda:
    def __init__(self) -> None:
        self.num_synchronizes = 0

    def is_available(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def init(self) -> None:
        pass

    def synchronize(self, device) -> None:
        self.num_synchronizes += 1

    def as_tensor(self, address, num_bytes, device):
        return torch.empty(num_bytes, dtype=torch.uint8, device="meta")


@pytest.fixture
def fake():
    driver, runtime = FakeDriver(), FakeTorchCuda()
    return driver, runtime, CudaBackend(0, driver=driver, torch_cuda=runtime)


def test_holes_are_backed_by_the_scratch_chunk_and_always_accessible(fake):
    driver, runtime, backend = fake
    (scratch,) = driver.handles
    address = backend.reserve(4 * G)
    granules = [address + i * G for i in range(4)]
    assert [driver.handle_at(g) for g in granules] == [scratch] * 4
    assert set(granules) <= driver.accessible
    chunks = [backend.create_chunk(G) for _ in range(2)] + [backend.create_chunk(2 * G)]
    backend.map_run(address, chunks[:2])
    backend.map(address + 2 * G, chunks[2])
    assert [driver.handle_at(g) for g in granules] == [c.handle for c in chunks[:2]] + [chunks[2].handle] * 2
    assert set(granules) <= driver.accessible
    syncs = runtime.num_synchronizes
    assert backend.unmap(address, 4 * G) == chunks
    assert runtime.num_synchronizes == syncs + 1  # synchronized before unmapping
    assert [driver.handle_at(g) for g in granules] == [scratch] * 4 and set(granules) <= driver.accessible
    backend.map(address + G, chunks[0])
    assert driver.handle_at(address + G) == chunks[0].handle
    assert not [call for call in driver.calls if call.startswith("FAILED")]


def test_release_free_and_close_leave_the_driver_clean(fake):
    driver, _, backend = fake
    address = backend.reserve(2 * G)
    chunk = backend.create_chunk(G)
    backend.map(address, chunk)
    with pytest.raises(ValueError, match="still mapped"):
        backend.release_chunk(chunk)
    backend.unmap(address, G)
    backend.release_chunk(chunk)
    assert chunk.handle not in driver.handles and backend.physical_bytes() == 0
    backend.free_reservation(address, 2 * G)
    assert driver.mappings == {} and driver.reservations == {}
    backend.map(backend.reserve(G), backend.create_chunk(G))
    backend.close()
    assert driver.mappings == {} and driver.reservations == {} and driver.handles == {}
    assert driver.context_refs == 0


def test_device_out_of_memory_is_a_memory_error_and_inflate_gives_nothing():
    driver = FakeDriver(capacity_bytes=4 * G)  # the scratch chunk takes one granule
    backend = CudaBackend(0, driver=driver, torch_cuda=FakeTorchCuda())
    pool = ElasticPool(backend, 8 * G, G)
    pool.register("kv")
    pool.inflate("kv", 2)
    with pytest.raises(MemoryError, match="CUDA_ERROR_OUT_OF_MEMORY"):
        pool.inflate("kv", 2)
    assert pool.num_held("kv") == 2 and pool.num_free() == 6 and pool.num_alive == 3
    assert pool.inflate("kv", 1)[0].owner == "kv"
    with pytest.raises(RuntimeError, match="CUDA_ERROR_INVALID_VALUE"):
        backend._call(driver.cuMemRelease, 12345)
    backend.close()


def test_granularity_must_be_a_multiple_of_the_drivers():
    with pytest.raises(ValueError, match="multiple of the driver"):
        CudaBackend(0, granularity=3 << 20, driver=FakeDriver(), torch_cuda=FakeTorchCuda())
