"""Fixtures for the memory tests: backends that are closed after each test, and memory probes."""

from __future__ import annotations

import os

import pytest

from memory import create_backend

PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def host():
    backend = create_backend("host")
    yield backend
    backend.close()


@pytest.fixture
def sim():
    backend = create_backend("sim")
    yield backend
    backend.close()


def _rss_bytes() -> int:
    """RssAnon + RssShmem of this process (memfd pages count as shmem while mapped)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["RssAnon"] + fields["RssShmem"]


def _num_vmas_in(start: int, end: int) -> int:
    """Kernel mappings (VMAs) of this process that overlap [start, end)."""
    count = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(part, 16) for part in line.split()[0].split("-"))
            if low < end and high > start:
                count += 1
    return count


@pytest.fixture
def rss_bytes():
    """Callable returning RssAnon + RssShmem of this process in bytes."""
    return _rss_bytes


@pytest.fixture
def num_vmas_in():
    """Callable counting this process's kernel mappings that overlap [start, end)."""
    return _num_vmas_in
