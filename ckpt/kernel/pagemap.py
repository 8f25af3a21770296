"""/proc/PID/pagemap: the PAGEMAP_SCAN ioctl (Linux 6.7+) and raw 8-byte entries.

PAGEMAP_SCAN returns page ranges already coalesced by the kernel (adjacent pages with equal
categories form one region), so nothing here loops per page in Python. Raw entries are
turned into runs with bytes operations (strided bytes slices, ``bytes.translate``
and ``bytes.find``), looping once per run, not per page.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from array import array

from ckpt.errors import KernelError
from ckpt.kernel.sys import NR, PAGE_SIZE, errno_of, syscall

# ---- PAGEMAP_SCAN (include/uapi/linux/fs.h) ----

PM_SCAN_WP_MATCHING = 1 << 0  # write-protect what matched: "get and re-arm"
PM_SCAN_CHECK_WPASYNC = 1 << 1  # EPERM on a VMA not registered for async WP

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8
PAGE_IS_ALL = (1 << 9) - 1

CATEGORY_NAMES: dict[int, str] = {
    PAGE_IS_WPALLOWED: "WPALLOWED",
    PAGE_IS_WRITTEN: "WRITTEN",
    PAGE_IS_FILE: "FILE",
    PAGE_IS_PRESENT: "PRESENT",
    PAGE_IS_SWAPPED: "SWAPPED",
    PAGE_IS_PFNZERO: "PFNZERO",
    PAGE_IS_HUGE: "HUGE",
    PAGE_IS_SOFT_DIRTY: "SOFT_DIRTY",
    PAGE_IS_GUARD: "GUARD",
}

DEFAULT_VEC_LEN = 4096


class page_region(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("categories", ctypes.c_uint64),
    ]


class pm_scan_arg(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(pm_scan_arg) << 16) | (ord("f") << 8) | 16
assert PAGEMAP_SCAN == 0xC0606610
assert ctypes.sizeof(page_region) == 24


def category_names(categories: int) -> str:
    """``WRITTEN|PRESENT`` style rendering of a categories mask (``0`` if empty)."""
    return "|".join(n for bit, n in CATEGORY_NAMES.items() if categories & bit) or "0"


def new_scan_vec(vec_len: int = DEFAULT_VEC_LEN) -> array[int]:
    """A reusable output buffer for :func:`pagemap_scan` (3 x u64 per region)."""
    return array("Q", bytes(24 * vec_len))


def pagemap_scan(
    pagemap_fd: int,
    start: int,
    end: int,
    *,
    flags: int = 0,
    category_inverted: int = 0,
    category_mask: int = 0,
    category_anyof_mask: int = 0,
    return_mask: int = PAGE_IS_ALL,
    max_pages: int = 0,
    vec: array[int] | None = None,
) -> list[tuple[int, int, int]]:
    """PAGEMAP_SCAN over [start, end); returns (start, end, categories) regions.

    A page matches when ``(categories ^ category_inverted) & category_mask`` equals
    ``category_mask`` and, if ``category_anyof_mask`` is set, shares a bit with it.
    When the output vector fills up, the walk resumes from ``walk_end``; a region split by
    that boundary is merged back. ``max_pages`` (0 = unlimited) bounds the pages reported
    (and, with PM_SCAN_WP_MATCHING, the pages re-protected). ``vec`` may be passed to
    reuse a buffer from :func:`new_scan_vec` across calls.
    """
    buf = vec if vec is not None else new_scan_vec()
    vec_len = len(buf) // 3
    if vec_len == 0:
        raise ValueError("pagemap_scan needs a vec of at least one region")
    vec_addr = buf.buffer_info()[0]
    words = memoryview(buf)
    out: list[tuple[int, int, int]] = []
    found = 0
    pos = start
    while pos < end:
        limit = 0
        if max_pages:
            limit = max_pages - found
            if limit <= 0:
                break
        arg = pm_scan_arg(
            size=ctypes.sizeof(pm_scan_arg),
            flags=flags,
            start=pos,
            end=end,
            walk_end=0,
            vec=vec_addr,
            vec_len=vec_len,
            max_pages=limit,
            category_inverted=category_inverted,
            category_mask=category_mask,
            category_anyof_mask=category_anyof_mask,
            return_mask=return_mask,
        )
        n = syscall(
            NR.ioctl,
            pagemap_fd,
            PAGEMAP_SCAN,
            ctypes.addressof(arg),
            what=f"PAGEMAP_SCAN({pos:#x}-{end:#x})",
        )
        vals = words[: 3 * n].tolist()
        regions = list(zip(vals[0::3], vals[1::3], vals[2::3], strict=True))
        if regions and out and out[-1][1] == regions[0][0] and out[-1][2] == regions[0][2]:
            first = regions.pop(0)
            out[-1] = (out[-1][0], first[1], first[2])
            found += (first[1] - first[0]) // PAGE_SIZE
        found += sum(e - s for s, e, _ in regions) // PAGE_SIZE
        out.extend(regions)
        walk_end = int(arg.walk_end)
        if n < vec_len or walk_end <= pos:
            break  # the walk ended (done, or max_pages reached) without filling the vec
        pos = walk_end
    return out


@functools.cache
def guard_category() -> int:
    """PAGE_IS_GUARD if this kernel's PAGEMAP_SCAN knows it (Linux 6.14+), else 0 (an
    unknown category bit is EINVAL)."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pagemap_scan(fd, 0, PAGE_SIZE, category_mask=PAGE_IS_GUARD, return_mask=PAGE_IS_GUARD)
    except KernelError:
        return 0
    finally:
        os.close(fd)
    return PAGE_IS_GUARD


# ---- raw pagemap entries ----

PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD = 1 << 58
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

_READ_CHUNK = 1 << 21  # 2 MiB of entries (1 GiB of address space) per pread


def read_pagemap_entries(pagemap_fd: int, start: int, end: int) -> array[int]:
    """The 8-byte pagemap entries of the pages of [start, end) (page-aligned addresses).

    Unmapped pages read as 0. Reading past the end of the address space stops early and
    leaves the remaining entries 0.
    """
    if start % PAGE_SIZE or end % PAGE_SIZE or end < start:
        raise ValueError(f"unaligned pagemap range {start:#x}-{end:#x}")
    count = (end - start) // PAGE_SIZE
    entries = array("Q", bytes(8 * count))
    raw = memoryview(entries).cast("B")
    offset = start // PAGE_SIZE * 8
    done = 0
    total = 8 * count
    while done < total:
        chunk = raw[done : min(total, done + _READ_CHUNK)]
        try:
            got = os.preadv(pagemap_fd, [chunk], offset + done)
        except OSError as exc:
            where = start + done // 8 * PAGE_SIZE
            raise KernelError(errno_of(exc), f"pread pagemap at {where:#x}") from exc
        if got <= 0:
            break
        done += got
    return entries


@functools.lru_cache(maxsize=64)
def _flag_table(want: int, reject: int) -> bytes:
    """256-byte translate table: byte value -> 1 if it has a bit of want and none of reject."""
    return bytes(1 if (v & want) and not (v & reject) else 0 for v in range(256))


def _byte_flags(raw: bytes, byte_index: int, byte_mask: int, count: int) -> int:
    """Per-page 0/1 flags (as a big integer, one byte per page) for one byte of each entry."""
    column = raw[byte_index::8]
    assert len(column) == count
    return int.from_bytes(column.translate(_flag_table(byte_mask, 0)), "little")


def match_flags(entries: array[int], want_mask: int, reject_mask: int = 0) -> bytes:
    """One byte per entry: 1 if the entry has any bit of want_mask and none of reject_mask."""
    count = len(entries)
    if count == 0 or want_mask == 0:
        return bytes(count)
    # One copy, then strided bytes slicing (C loops; ~5x faster than a strided memoryview).
    raw = entries.tobytes()
    little = sys.byteorder == "little"

    def byte_at(k: int) -> int:  # offset within an 8-byte entry of value bits 8k..8k+7
        return k if little else 7 - k

    want_bytes = {k: (want_mask >> (8 * k)) & 0xFF for k in range(8)}
    reject_bytes = {k: (reject_mask >> (8 * k)) & 0xFF for k in range(8)}
    used = [k for k in range(8) if want_bytes[k] or reject_bytes[k]]
    if len(used) == 1:
        # Common case (e.g. PRESENT|SWAP minus FILE): one column, one table.
        k = used[0]
        table = _flag_table(want_bytes[k], reject_bytes[k])
        return raw[byte_at(k) :: 8].translate(table)
    want = 0
    reject = 0
    for k in used:
        if want_bytes[k]:
            want |= _byte_flags(raw, byte_at(k), want_bytes[k], count)
        if reject_bytes[k]:
            reject |= _byte_flags(raw, byte_at(k), reject_bytes[k], count)
    if reject:
        ones = int.from_bytes(b"\x01" * count, "little")
        want &= ones ^ reject
    return want.to_bytes(count, "little")


def flag_runs(flags: bytes, base_vaddr: int) -> list[tuple[int, int]]:
    """(vaddr, length) runs of pages whose flag byte is 1; one loop step per run."""
    runs: list[tuple[int, int]] = []
    find = flags.find
    n = len(flags)
    pos = find(1)
    while pos >= 0:
        stop = find(0, pos)
        if stop < 0:
            stop = n
        runs.append((base_vaddr + pos * PAGE_SIZE, (stop - pos) * PAGE_SIZE))
        if stop == n:
            break
        pos = find(1, stop)
    return runs


def present_runs(
    entries: array[int], base_vaddr: int, want_mask: int, reject_mask: int = 0
) -> list[tuple[int, int]]:
    """(vaddr, length) runs of pages whose entry has any bit of want_mask and none of
    reject_mask; ``entries[i]`` describes the page at ``base_vaddr + i * PAGE_SIZE``."""
    return flag_runs(match_flags(entries, want_mask, reject_mask), base_vaddr)


# A swap-like pagemap entry whose swap type is 31 is a PTE marker, not data: userfaultfd
# write-protect leaves one on every never-populated page it protects (seen as PM_SWAP with
# frame 0x3f: type 31, marker bit PTE_MARKER_UFFD_WP). Only root sees the frame bits;
# without them a marker reads as a real swapped page, which errs towards copying zeros.
SWAP_TYPE_BITS = 0x1F
SWP_PTE_MARKER = 0x1F


MADV_HUGEPAGE = 14
HUGE_PAGES = 512  # 4 KiB frames of a PMD-sized (2 MiB) huge page


def _probe_frame(length: int, advice: int = 0) -> int:
    """The frame a read fault maps at the start of ``length`` bytes of fresh anonymous
    memory (aligned to ``length``; with madvise ``advice`` first); 0 if frames are hidden."""
    span = 2 * length
    base = syscall(NR.mmap, 0, span, 1, 0x22, -1, 0, what="mmap")  # PROT_READ, anon
    try:
        addr = -(-base // length) * length
        if advice:
            syscall(NR.madvise, addr, length, advice, what="madvise")
        ctypes.string_at(addr, 1)  # the read fault maps the zero page (or the huge one)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            (entry,) = read_pagemap_entries(fd, addr, addr + PAGE_SIZE)
        finally:
            os.close(fd)
    finally:
        syscall(NR.munmap, base, span, what="munmap")
    return entry & PM_PFN_MASK if entry & PM_PRESENT else 0


@functools.cache
def zero_pfn() -> int:
    """The frame of the kernel's shared zero page, which a read fault maps into untouched
    anonymous memory; 0 if this process cannot see frames (then none is recognized)."""
    return _probe_frame(PAGE_SIZE)


@functools.cache
def huge_zero_pfn() -> int:
    """The first frame of the huge zero page, which a read fault maps into an untouched
    2 MiB extent of a THP VMA (``use_zero_page``); 0 if there is none here (no THP, no
    huge zero page, frames hidden)."""
    try:
        pfn = _probe_frame(HUGE_PAGES * PAGE_SIZE, MADV_HUGEPAGE)
    except KernelError:  # no THP: madvise refused
        return 0
    base = pfn - pfn % HUGE_PAGES
    return base if pfn and pfn != zero_pfn() else 0


@functools.lru_cache(maxsize=64)
def _equal_table(mask: int, value: int) -> bytes:
    return bytes(1 if v & mask == value else 0 for v in range(256))


def _frames_equal(raw: bytes, want: int, mask: int) -> int:
    """Per-entry 0/1 bytes (a big integer) of the entries with ``entry & mask == want``,
    one bytes column at a time, lowest first (the most selective: a frame's low bits)."""
    out = -1
    for k in range(8):
        col = raw[(k if sys.byteorder == "little" else 7 - k) :: 8]
        out &= int.from_bytes(col.translate(_equal_table((mask >> 8 * k) & 0xFF,
                                                         (want >> 8 * k) & 0xFF)), "little")
        if not out:
            break
    return out


def zero_page_flags(entries: array[int]) -> int:
    """Per-entry 0/1 bytes (as a big integer, like match_flags) of the present pages that
    map the shared zero page, or a frame of the huge zero page: read, never written, they
    hold no data. 0 when frames are hidden (zero_pfn() == 0)."""
    pfn = zero_pfn()
    if not pfn or not entries:
        return 0
    raw = entries.tobytes()
    out = _frames_equal(raw, PM_PRESENT | pfn, PM_PRESENT | PM_PFN_MASK)
    huge = huge_zero_pfn()
    if huge:
        out |= _frames_equal(raw, PM_PRESENT | huge, PM_PRESENT | (PM_PFN_MASK & ~(HUGE_PAGES - 1)))
    return out


def data_runs(entries: array[int], base_vaddr: int, reject_file: bool = False,
              ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(exists, present) runs: pages holding data (present, or swapped out for real) and
    the present ones; with ``reject_file``, only anonymous (COW'd) pages count. A page
    mapping the shared zero page holds no data: it counts as neither (it reads as zeros,
    as a hole restores)."""
    count = len(entries)
    if count == 0:
        return [], []
    reject = PM_FILE if reject_file else 0
    present = match_flags(entries, PM_PRESENT, reject)
    # a file's pages are never the zero page (a read fault maps the page cache's)
    zero = 0 if reject_file or present.find(1) < 0 else zero_page_flags(entries)
    if zero:
        present = (int.from_bytes(present, "little") & ~zero).to_bytes(count, "little")
    swapped = int.from_bytes(match_flags(entries, PM_SWAP, PM_PRESENT | reject), "little")
    if swapped:
        raw = entries.tobytes()
        low = raw[0 if sys.byteorder == "little" else 7 :: 8]
        marker = int.from_bytes(low.translate(_marker_table()), "little")
        swapped &= ~marker
    exists = (int.from_bytes(present, "little") | swapped).to_bytes(count, "little")
    return flag_runs(exists, base_vaddr), flag_runs(present, base_vaddr)


@functools.lru_cache(maxsize=1)
def _marker_table() -> bytes:
    return bytes(1 if v & SWAP_TYPE_BITS == SWP_PTE_MARKER else 0 for v in range(256))
