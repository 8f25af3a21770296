"""The kernel facts the soft-dirty dirty-tracking backend relies on, checked for real.

Needs CONFIG_MEM_SOFT_DIRTY: skipped on kernels without it (tests/vm/plugin.py), run in a
QEMU guest with Debian's 6.1 kernel by tests/test_in_guest.py. Each test works on a fresh
anonymous mapping of this very process, read through ckpt's own readers.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

import pytest

from ckpt.collect.maps import read_smaps_vmflags
from ckpt.kernel import pagemap as pm
from ckpt.kernel.sys import NR, PAGE_SIZE, syscall

pytestmark = pytest.mark.soft_dirty

PROT_NONE = 0x0
PROT_RW = 0x1 | 0x2
MAP_PRIVATE_ANON = 0x02 | 0x20
MAP_FIXED_NOREPLACE = 0x100000
MADV_DONTNEED = 4
NPAGES = 4


def mmap(addr: int, npages: int, flags: int = 0) -> int:
    return syscall(NR.mmap, addr, npages * PAGE_SIZE, PROT_RW, MAP_PRIVATE_ANON | flags, -1, 0,
                   what="mmap")


def munmap(addr: int, npages: int) -> None:
    syscall(NR.munmap, addr, npages * PAGE_SIZE, what="munmap")


@pytest.fixture
def area() -> Iterator[int]:
    """A fresh private anonymous read-write mapping of NPAGES pages, between two PROT_NONE
    guard pages so that no mapping the interpreter makes meanwhile can merge with it (a
    merge would give the VMA its soft-dirty flag back)."""
    base = mmap(0, NPAGES + 2)
    try:
        for guard in (base, page(base, NPAGES + 1)):
            syscall(NR.mprotect, guard, PAGE_SIZE, PROT_NONE, what="mprotect")
        yield page(base, 1)
    finally:
        munmap(base, NPAGES + 2)


@pytest.fixture
def pagemap_fd() -> Iterator[int]:
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def page(addr: int, i: int) -> int:
    return addr + i * PAGE_SIZE


def write(addr: int, value: int = 0x5A) -> None:
    ctypes.memset(addr, value, 1)


def read(addr: int) -> int:
    return ctypes.c_ubyte.from_address(addr).value


def entry(fd: int, addr: int) -> int:
    return pm.read_pagemap_entries(fd, addr, addr + PAGE_SIZE)[0]


def soft_dirty(fd: int, addr: int) -> bool:
    return bool(entry(fd, addr) & pm.PM_SOFT_DIRTY)


def present(fd: int, addr: int) -> bool:
    return bool(entry(fd, addr) & pm.PM_PRESENT)


def vma_flags(addr: int) -> tuple[str, ...]:
    """VmFlags of the VMA containing addr (it may have been merged with a neighbour, so
    its start is the greatest VMA start at or below addr)."""
    flags = read_smaps_vmflags(os.getpid())
    start = max(s for s in flags if s <= addr)
    return flags[start]


def clear_soft_dirty() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("4")


def test_fresh_mapping_is_soft_dirty(area: int, pagemap_fd: int) -> None:
    assert "sd" in vma_flags(area)
    write(page(area, 0))
    assert present(pagemap_fd, page(area, 0))
    assert soft_dirty(pagemap_fd, page(area, 0))
    # an untouched page of a new VMA also reads soft-dirty: the VMA flag stands for it
    assert not present(pagemap_fd, page(area, 1))
    assert soft_dirty(pagemap_fd, page(area, 1))


def test_clear_refs_then_only_written_pages_are_dirty(area: int, pagemap_fd: int) -> None:
    for i in range(NPAGES - 1):  # the last page stays untouched
        write(page(area, i))
    clear_soft_dirty()
    assert "sd" not in vma_flags(area), "clear_refs 4 clears the VMA's soft-dirty flag"
    assert not any(soft_dirty(pagemap_fd, page(area, i)) for i in range(NPAGES))

    write(page(area, 1))
    assert read(page(area, 2)) == 0x5A  # a read does not dirty
    assert soft_dirty(pagemap_fd, page(area, 1)), "written page lacks pagemap bit 55"
    assert present(pagemap_fd, page(area, 2))
    assert not soft_dirty(pagemap_fd, page(area, 0)), "unwritten present page is dirty"
    assert not soft_dirty(pagemap_fd, page(area, 2)), "read-only page is dirty"
    assert not present(pagemap_fd, page(area, 3))
    assert not soft_dirty(pagemap_fd, page(area, 3)), "untouched page is dirty"

    clear_soft_dirty()  # clearing again re-arms: the written page is clean again
    assert not soft_dirty(pagemap_fd, page(area, 1))
    write(page(area, 1), 0x33)
    assert soft_dirty(pagemap_fd, page(area, 1))


def test_new_mapping_in_place_is_soft_dirty_again(area: int, pagemap_fd: int) -> None:
    write(page(area, 0))
    clear_soft_dirty()
    assert "sd" not in vma_flags(area)
    assert not soft_dirty(pagemap_fd, page(area, 0))
    munmap(area, NPAGES)
    assert mmap(area, NPAGES, MAP_FIXED_NOREPLACE) == area
    assert "sd" in vma_flags(area), "a new VMA in place of a clean one lacks sd"
    # not present, but soft-dirty: a tracker sees that the old contents are gone
    assert not present(pagemap_fd, page(area, 0))
    assert soft_dirty(pagemap_fd, page(area, 0))
    assert read(page(area, 0)) == 0


def test_madv_dontneed_page_reads_not_present_and_clean(area: int, pagemap_fd: int) -> None:
    write(page(area, 0))
    write(page(area, 1))
    clear_soft_dirty()
    write(page(area, 0), 0x77)  # dirty, then dropped
    assert soft_dirty(pagemap_fd, page(area, 0))
    syscall(NR.madvise, page(area, 0), 2 * PAGE_SIZE, MADV_DONTNEED, what="madvise")
    for i in (0, 1):
        assert not present(pagemap_fd, page(area, i)), f"page {i} present after DONTNEED"
        # The dropped contents (now zero-fill) are not reported dirty: a tracker must
        # treat pages that went from present to not-present as changed.
        assert not soft_dirty(pagemap_fd, page(area, i)), f"page {i} dirty after DONTNEED"
    assert "sd" not in vma_flags(area)
    assert read(page(area, 0)) == 0
