"""userfaultfd async write-protect + PAGEMAP_SCAN on this process's own memory, and
present_runs against a plain reference implementation."""

from __future__ import annotations

import ctypes
import errno
import os
import random
from array import array
from collections.abc import Iterator

import pytest

from ckpt.errors import KernelError
from ckpt.kernel import pagemap as pm
from ckpt.kernel import uffd
from ckpt.kernel.sys import NR, PAGE_SIZE, syscall

P = PAGE_SIZE
N = 64
PROT_RW = 0x3
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x02, 0x10, 0x20


def mmap_anon(length: int, addr: int = 0, fixed: bool = False) -> int:
    flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_FIXED if fixed else 0)
    return syscall(NR.mmap, addr, length, PROT_RW, flags, -1, 0, what="mmap")


def touch(addr: int, page: int, value: int = 1) -> None:
    ctypes.memset(addr + page * P, value, 1)


@pytest.fixture
def area() -> Iterator[int]:
    addr = mmap_anon(N * P)
    try:
        yield addr
    finally:
        syscall(NR.munmap, addr, N * P)


@pytest.fixture
def ufd() -> Iterator[int]:
    fd = uffd.create_uffd_self()
    try:
        granted = uffd.uffd_api(fd, uffd.WP_ASYNC_FEATURES)
        assert granted & uffd.WP_ASYNC_FEATURES == uffd.WP_ASYNC_FEATURES
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def pmfd() -> Iterator[int]:
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def pages(regions: list[tuple[int, int, int]], base: int) -> list[int]:
    return [p for s, e, _ in regions for p in range((s - base) // P, (e - base) // P)]


def written(pmfd: int, base: int, rearm: bool, check: bool = False) -> list[int]:
    flags = pm.PM_SCAN_WP_MATCHING if rearm else 0
    flags |= pm.PM_SCAN_CHECK_WPASYNC if check else 0
    regions = pm.pagemap_scan(
        pmfd, base, base + N * P, flags=flags,
        category_mask=pm.PAGE_IS_WRITTEN, return_mask=pm.PAGE_IS_WRITTEN,
    )
    return pages(regions, base)


def smaps_flags(addr: int) -> list[str]:
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no VMA at {addr:#x}")


def test_ioctl_numbers() -> None:
    assert uffd.UFFDIO_API == 0xC018AA3F
    assert uffd.UFFDIO_REGISTER == 0xC020AA00
    assert uffd.UFFDIO_UNREGISTER == 0x8010AA01
    assert uffd.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert pm.PAGEMAP_SCAN == 0xC0606610
    assert ctypes.sizeof(pm.pm_scan_arg) == 96


def test_api_twice_fails(ufd: int) -> None:
    with pytest.raises(KernelError) as ei:
        uffd.uffd_api(ufd, uffd.WP_ASYNC_FEATURES)
    assert ei.value.errno == errno.EINVAL


def test_written_pages_and_rearm(area: int, ufd: int, pmfd: int) -> None:
    for p in range(32):  # half populated, half never touched
        touch(area, p)
    uffd.uffd_register_wp(ufd, area, N * P)
    assert "uw" in smaps_flags(area)
    uffd.uffd_writeprotect(ufd, area, N * P)
    assert written(pmfd, area, rearm=False) == []
    for p in (0, 2, 3, 4, 31, 40, 63):  # 40 and 63 were never populated
        touch(area, p, 7)
    assert written(pmfd, area, rearm=True, check=True) == [0, 2, 3, 4, 31, 40, 63]
    assert written(pmfd, area, rearm=True, check=True) == []  # re-armed: second scan empty
    touch(area, 3, 9)
    touch(area, 50, 9)
    assert written(pmfd, area, rearm=True) == [3, 50]
    assert ctypes.string_at(area + 3 * P, 1) == b"\x09"  # writes really landed


def test_never_touched_area(area: int, ufd: int, pmfd: int) -> None:
    uffd.uffd_register_wp(ufd, area, N * P)
    uffd.uffd_writeprotect(ufd, area, N * P)
    assert written(pmfd, area, rearm=True) == []
    regions = pm.pagemap_scan(pmfd, area, area + N * P)
    assert pages(regions, area) == list(range(N))  # every page reported, none WRITTEN
    assert all(c & pm.PAGE_IS_WPALLOWED and not c & pm.PAGE_IS_WRITTEN for _, _, c in regions)
    touch(area, 17)
    assert written(pmfd, area, rearm=True) == [17]


def test_remap_in_place_loses_registration(area: int, ufd: int, pmfd: int) -> None:
    uffd.uffd_register_wp(ufd, area, N * P)
    uffd.uffd_writeprotect(ufd, area, N * P)
    def untracked() -> list[tuple[int, int, int]]:
        wpa = pm.PAGE_IS_WPALLOWED
        return pm.pagemap_scan(pmfd, area, area + N * P, category_inverted=wpa,
                               category_mask=wpa, return_mask=wpa)

    assert untracked() == []
    # munmap + mmap of pages 8..15 in place: same address, new unregistered VMA
    syscall(NR.munmap, area + 8 * P, 8 * P)
    assert mmap_anon(8 * P, area + 8 * P, fixed=True) == area + 8 * P
    touch(area, 9)
    touch(area, 20)
    # WP_MATCHING silently skips the unregistered VMA ...
    assert written(pmfd, area, rearm=True) == [20]
    # ... CHECK_WPASYNC refuses it ...
    with pytest.raises(KernelError) as ei:
        pm.pagemap_scan(pmfd, area, area + N * P, flags=pm.PM_SCAN_CHECK_WPASYNC,
                        category_mask=pm.PAGE_IS_WRITTEN)
    assert ei.value.errno == errno.EPERM
    # ... and the inverted WPALLOWED scan finds exactly it.
    assert untracked() == [(area + 8 * P, area + 16 * P, 0)]
    uffd.uffd_register_wp(ufd, area + 8 * P, 8 * P)
    uffd.uffd_writeprotect(ufd, area + 8 * P, 8 * P)
    assert untracked() == []
    touch(area, 12)
    assert written(pmfd, area, rearm=True) == [12]


def test_unregister(area: int, ufd: int, pmfd: int) -> None:
    uffd.uffd_register_wp(ufd, area, N * P)
    uffd.uffd_unregister(ufd, area, N * P)
    assert "uw" not in smaps_flags(area)
    with pytest.raises(KernelError):
        uffd.uffd_writeprotect(ufd, area, N * P)


def test_unprotect(area: int, ufd: int, pmfd: int) -> None:
    uffd.uffd_register_wp(ufd, area, N * P)
    uffd.uffd_writeprotect(ufd, area, N * P)
    uffd.uffd_writeprotect(ufd, area, N * P, protect=False)
    touch(area, 5)
    assert 5 in written(pmfd, area, rearm=False)  # unprotected pages read WRITTEN


def test_scan_continuation_small_vec(area: int, pmfd: int) -> None:
    for p in range(0, N, 2):  # alternating present / absent: N regions
        touch(area, p)
    full = pm.pagemap_scan(pmfd, area, area + N * P, return_mask=pm.PAGE_IS_PRESENT)
    assert len(full) == N
    assert pm.pagemap_scan(pmfd, area, area + N * P, return_mask=pm.PAGE_IS_PRESENT,
                           vec=pm.new_scan_vec(3)) == full
    present = pm.pagemap_scan(pmfd, area, area + N * P, category_mask=pm.PAGE_IS_PRESENT,
                              return_mask=pm.PAGE_IS_PRESENT, vec=pm.new_scan_vec(5))
    assert pages(present, area) == list(range(0, N, 2))
    limited = pm.pagemap_scan(pmfd, area, area + N * P, category_mask=pm.PAGE_IS_PRESENT,
                              return_mask=pm.PAGE_IS_PRESENT, max_pages=7, vec=pm.new_scan_vec(2))
    assert pages(limited, area) == list(range(0, 14, 2))
    # a region split across a vec boundary is merged back
    touch(area, 1)
    merged = pm.pagemap_scan(pmfd, area, area + 4 * P, category_mask=pm.PAGE_IS_PRESENT,
                             return_mask=pm.PAGE_IS_PRESENT, vec=pm.new_scan_vec(1))
    assert merged == [(area, area + 3 * P, pm.PAGE_IS_PRESENT)]


def test_read_pagemap_entries(area: int, pmfd: int) -> None:
    for p in (0, 5, 6, 63):
        touch(area, p)
    entries = pm.read_pagemap_entries(pmfd, area, area + N * P)
    assert len(entries) == N
    assert [i for i, e in enumerate(entries) if e & pm.PM_PRESENT] == [0, 5, 6, 63]
    assert pm.present_runs(entries, area, pm.PM_PRESENT | pm.PM_SWAP) == [
        (area, P), (area + 5 * P, 2 * P), (area + 63 * P, P)
    ]
    assert pm.present_runs(entries, area, pm.PM_PRESENT, reject_mask=pm.PM_EXCLUSIVE) == []


# ---- present_runs vs a reference ----


def reference_runs(entries: array[int], base: int, want: int, reject: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i, e in enumerate(entries):
        if e & want and not e & reject:
            if runs and runs[-1][0] + runs[-1][1] == base + i * P:
                runs[-1] = (runs[-1][0], runs[-1][1] + P)
            else:
                runs.append((base + i * P, P))
    return runs


BITS = [pm.PM_PRESENT, pm.PM_SWAP, pm.PM_FILE, pm.PM_EXCLUSIVE, pm.PM_SOFT_DIRTY, pm.PM_UFFD_WP]
MASKS = [
    (pm.PM_PRESENT, 0),
    (pm.PM_PRESENT | pm.PM_SWAP, 0),
    (pm.PM_PRESENT | pm.PM_SWAP, pm.PM_FILE),
    (pm.PM_SOFT_DIRTY, 0),  # another byte of the entry
    (pm.PM_PRESENT | pm.PM_SOFT_DIRTY, pm.PM_FILE),  # two bytes
    (pm.PM_PRESENT, pm.PM_SOFT_DIRTY | pm.PM_UFFD_WP),
    (pm.PM_SWAP, pm.PM_PRESENT | 1),  # reject a PFN bit (byte 0)
]


@pytest.mark.parametrize(("want", "reject"), MASKS)
def test_present_runs_random(want: int, reject: int) -> None:
    rng = random.Random(want ^ reject)
    base = 0x7F12_3456_0000
    for n in (1, 2, 7, 64, 1000):
        for density in (0.0, 0.1, 0.5, 0.9, 1.0):
            entries = array("Q", (
                sum(b for b in BITS if rng.random() < density) | rng.getrandbits(8)
                for _ in range(n)
            ))
            got = pm.present_runs(entries, base, want, reject)
            assert got == reference_runs(entries, base, want, reject), (n, density)


def test_present_runs_edges() -> None:
    base = 0x10000
    n = 100
    allp = array("Q", [pm.PM_PRESENT | 0x1234] * n)
    assert pm.present_runs(allp, base, pm.PM_PRESENT) == [(base, n * P)]
    assert pm.present_runs(allp, base, pm.PM_SWAP) == []
    assert pm.present_runs(array("Q", [0] * n), base, pm.PM_PRESENT) == []
    assert pm.present_runs(array("Q"), base, pm.PM_PRESENT) == []
    first = array("Q", [0] * n)
    first[0] = pm.PM_PRESENT
    assert pm.present_runs(first, base, pm.PM_PRESENT) == [(base, P)]
    last = array("Q", [0] * n)
    last[-1] = pm.PM_SWAP
    assert pm.present_runs(last, base, pm.PM_PRESENT | pm.PM_SWAP) == [(base + (n - 1) * P, P)]
    both = array("Q", [pm.PM_PRESENT] + [0] * (n - 2) + [pm.PM_PRESENT])
    assert pm.present_runs(both, base, pm.PM_PRESENT) == [(base, P), (base + (n - 1) * P, P)]
    alt = array("Q", [pm.PM_PRESENT * (i % 2) for i in range(n)])
    assert pm.present_runs(alt, base, pm.PM_PRESENT) == [(base + i * P, P) for i in range(1, n, 2)]
    rejected = array("Q", [pm.PM_PRESENT | pm.PM_FILE] * n)
    assert pm.present_runs(rejected, base, pm.PM_PRESENT, pm.PM_FILE) == []
