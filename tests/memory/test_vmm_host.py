"""The host VMM backend: real mappings, zero reads of holes, memory returned, misuse refused."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from memory import BackendClosed, create_backend
from memory.vmm.host import HostBackend

PAGE = os.sysconf("SC_PAGE_SIZE")
CHUNK = 16 * PAGE
REPO = pathlib.Path(__file__).resolve().parents[2]


def test_registry_builds_host_and_rejects_unknown_names():
    backend = create_backend("host")
    assert isinstance(backend, HostBackend)
    assert backend.granularity == PAGE
    backend.close()
    with pytest.raises(KeyError, match="unknown VMM backend 'nope'"):
        create_backend("nope")


def test_as_tensor_is_zero_copy_and_reservation_reads_zeros(host):
    address = host.reserve(8 * CHUNK)
    view = host.as_tensor(address, 8 * CHUNK)
    assert view.data_ptr() == address
    assert view.dtype == torch.uint8 and view.numel() == 8 * CHUNK
    assert int(view.count_nonzero()) == 0


def test_map_write_alias_and_remap_keep_data(host):
    address = host.reserve(4 * CHUNK)
    view = host.as_tensor(address, 4 * CHUNK)
    chunk = host.create_chunk(CHUNK)
    assert int(host.as_tensor(address, CHUNK).count_nonzero()) == 0
    host.map(address, chunk)
    view[:CHUNK] = 7
    host.map(address + 2 * CHUNK, chunk)  # alias: same physical bytes at a second place
    assert chunk.num_mappings == 2
    assert torch.equal(view[2 * CHUNK:3 * CHUNK], view[:CHUNK])
    view[2 * CHUNK] = 9
    assert int(view[0]) == 9
    assert host.unmap(address, CHUNK) == [chunk]
    assert chunk.num_mappings == 1
    assert int(view[:CHUNK].count_nonzero()) == 0  # the hole reads zeros again
    host.map(address + 3 * CHUNK, chunk)
    assert int(view[3 * CHUNK]) == 9 and int(view[3 * CHUNK + 1]) == 7


def test_stray_read_of_unmapped_page_between_mapped_ones_reads_zeros(host):
    address = host.reserve(3 * CHUNK)
    first, last = host.create_chunk(CHUNK), host.create_chunk(CHUNK)
    host.map(address, first)
    host.map(address + 2 * CHUNK, last)
    view = host.as_tensor(address, 3 * CHUNK).view(torch.float32)
    host.as_tensor(address, CHUNK).fill_(0xFF)
    middle = view[CHUNK // 4:2 * CHUNK // 4]
    assert torch.equal(middle, torch.zeros_like(middle))
    assert bool(torch.isfinite(middle).all())


def test_contiguous_chunks_merge_into_one_mapping_and_holes_merge_back(host, num_vmas_in):
    num = 64
    address = host.reserve(num * CHUNK)
    end = address + num * CHUNK
    assert num_vmas_in(address, end) == 1
    chunks = [host.create_chunk(CHUNK) for _ in range(num)]
    assert [c.physical_offset for c in chunks] == [i * CHUNK for i in range(num)]
    for index, chunk in enumerate(chunks):
        host.map(address + index * CHUNK, chunk)
    assert num_vmas_in(address, end) == 1  # adjacent memfd offsets at adjacent addresses merge
    for index in range(0, num, 2):
        host.unmap(address + index * CHUNK, CHUNK)
    assert num_vmas_in(address, end) == num
    host.unmap(address, num * CHUNK)
    assert num_vmas_in(address, end) == 1  # every hole is the same zero mapping: they merge


def test_map_run_uses_one_mmap_per_contiguous_run(host, num_vmas_in, monkeypatch):
    chunks = [host.create_chunk(CHUNK) for _ in range(6)]
    address = host.reserve(6 * CHUNK)
    calls = []
    original = host._map_one
    monkeypatch.setattr(host, "_map_one", lambda *args: (calls.append(args), original(*args)))
    host.map_run(address, [chunks[0], chunks[1], chunks[2], chunks[5], chunks[3], chunks[4]])
    assert [(a - address, o, n) for a, o, n in calls] == [
        (0, 0, 3 * CHUNK), (3 * CHUNK, 5 * CHUNK, CHUNK), (4 * CHUNK, 3 * CHUNK, 2 * CHUNK)]
    assert [c.num_mappings for c in chunks] == [1] * 6
    assert host.unmap(address, 6 * CHUNK) == [chunks[i] for i in (0, 1, 2, 5, 3, 4)]


def test_release_returns_memory_to_the_os(host, rss_bytes):
    num = 256  # 16 MiB with 64 KiB chunks on 4 KiB pages
    address = host.reserve(num * CHUNK)
    chunks = [host.create_chunk(CHUNK) for _ in range(num)]
    assert host.physical_bytes() == num * CHUNK  # created chunks are allocated (prefault)
    host.map_run(address, chunks)
    before = rss_bytes()
    host.as_tensor(address, num * CHUNK).fill_(1)
    assert rss_bytes() - before >= 0.9 * num * CHUNK
    host.unmap(address, num * CHUNK)
    for chunk in chunks[: num // 2]:
        host.release_chunk(chunk)
    assert host.physical_bytes() == num // 2 * CHUNK
    for chunk in chunks[num // 2:]:
        host.release_chunk(chunk)
    assert host.physical_bytes() == 0
    assert rss_bytes() - before < 0.1 * num * CHUNK


def test_released_offsets_are_reused_lowest_first_and_read_zeros(host):
    chunks = [host.create_chunk(CHUNK) for _ in range(4)]
    address = host.reserve(CHUNK)
    host.map(address, chunks[1])
    host.as_tensor(address, CHUNK).fill_(3)
    host.unmap(address, CHUNK)
    host.release_chunk(chunks[3])
    host.release_chunk(chunks[1])
    reused = host.create_chunk(CHUNK)
    assert reused.physical_offset == CHUNK and reused.chunk_id == 4
    host.map(address, reused)
    assert int(host.as_tensor(address, CHUNK).count_nonzero()) == 0
    assert host.create_chunk(CHUNK).physical_offset == 3 * CHUNK
    assert host.create_chunk(CHUNK).physical_offset == 4 * CHUNK


def test_larger_granularity_aligns_reservations():
    backend = HostBackend(granularity=64 * PAGE)
    try:
        addresses = [backend.reserve(64 * PAGE * n) for n in (1, 3, 2)]
        assert all(address % (64 * PAGE) == 0 for address in addresses)
        chunk = backend.create_chunk(64 * PAGE)
        backend.map(addresses[1] + 64 * PAGE, chunk)
        backend.as_tensor(addresses[1], 3 * 64 * PAGE)[64 * PAGE:128 * PAGE].fill_(5)
        assert int(backend.as_tensor(addresses[1], 64 * PAGE).count_nonzero()) == 0
        with pytest.raises(ValueError, match="granularity"):
            backend.create_chunk(PAGE)
    finally:
        backend.close()


def test_misuse_is_refused_with_python_exceptions(host):
    address = host.reserve(4 * CHUNK)
    chunk = host.create_chunk(CHUNK)
    with pytest.raises(ValueError, match="not inside a reservation"):
        host.map(address + 4 * CHUNK, chunk)
    with pytest.raises(ValueError, match="not inside a reservation"):
        host.map(address + 3 * CHUNK + PAGE, chunk)  # sticks out of the end
    with pytest.raises(ValueError, match="granularity"):
        host.map(address + 1, chunk)
    with pytest.raises(ValueError, match="granularity"):
        host.create_chunk(CHUNK + 1)
    with pytest.raises(ValueError, match="granularity"):
        host.reserve(PAGE + 1)
    host.map(address, chunk)
    other = host.create_chunk(CHUNK)
    with pytest.raises(ValueError, match="already mapped"):
        host.map(address + PAGE, other)
    with pytest.raises(ValueError, match="overlaps"):
        host.map(address, other)
    with pytest.raises(ValueError, match="cuts a mapping"):
        host.unmap(address + PAGE, PAGE)
    with pytest.raises(ValueError, match="cuts a mapping"):
        host.unmap(address, PAGE)
    with pytest.raises(ValueError, match="still mapped"):
        host.release_chunk(chunk)
    with pytest.raises(ValueError, match="still has 1 mappings"):
        host.free_reservation(address, 4 * CHUNK)
    with pytest.raises(ValueError, match="no reservation"):
        host.free_reservation(address, 2 * CHUNK)
    host.map_run(address + CHUNK, [other, other])  # one run may alias a chunk too
    assert other.num_mappings == 2
    host.as_tensor(address + CHUNK, PAGE)[:] = 4
    assert int(host.as_tensor(address + 2 * CHUNK, PAGE)[0]) == 4
    assert host.unmap(address + CHUNK, 2 * CHUNK) == [other, other] and other.num_mappings == 0
    host.unmap(address, CHUNK)
    host.release_chunk(chunk)
    with pytest.raises(ValueError, match="already released"):
        host.release_chunk(chunk)
    with pytest.raises(ValueError, match="already released"):
        host.map(address, chunk)
    stranger = create_backend("host")
    try:
        with pytest.raises(ValueError, match="another backend"):
            host.map(address, stranger.create_chunk(CHUNK))
    finally:
        stranger.close()
    assert host.num_live_chunks == 1


def test_use_after_close_raises(host):
    address = host.reserve(CHUNK)
    chunk = host.create_chunk(CHUNK)
    host.map(address, chunk)
    host.close()
    host.close()  # idempotent
    assert chunk.is_released and chunk.num_mappings == 0
    for call in (lambda: host.reserve(CHUNK), lambda: host.create_chunk(CHUNK),
                 lambda: host.map(address, chunk), lambda: host.unmap(address, CHUNK),
                 lambda: host.as_tensor(address, CHUNK), lambda: host.physical_bytes()):
        with pytest.raises(BackendClosed):
            call()


def test_write_to_unmapped_page_kills_the_process_with_sigsegv():
    """The hole is a read-only zero mapping: a write faults inside torch's kernel, in C, where no
    Python exception can be raised, so the kernel delivers SIGSEGV. Hence the subprocess."""
    script = textwrap.dedent(f"""
        from memory import create_backend
        backend = create_backend("host")
        address = backend.reserve({2 * CHUNK})
        backend.map(address, backend.create_chunk({CHUNK}))
        view = backend.as_tensor(address, {2 * CHUNK})
        view[:{CHUNK}].fill_(1)
        print("mapped write ok", flush=True)
        view[{CHUNK}:].fill_(1)
        print("unreachable", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    assert result.stdout == "mapped write ok\n"
    assert result.returncode == -11  # SIGSEGV
