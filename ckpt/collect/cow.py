"""Private memory still shared copy-on-write with another process (after fork).

A restore gives each process its own copy of every private page it stores, so pages a
parent and child still share at the dump cost that much more memory afterwards (issue 11,
W8 phase 1: ``DumpStats.cow_shared_bytes``, shown by ``ckpt show``). Such a page is an
anonymous page mapped more than once: its /proc/PID/pagemap entry is present (bit 63),
not a file page (bit 61: page cache and shmem stay shared through their file) and not
exclusively mapped (bit 56, PM_MMAP_EXCLUSIVE, clear)::

    entry bits   63 present   61 file   56 exclusive     counted
    ----------   ----------   -------   ------------     -------
                 1            0         1                no   (written since the fork)
                 1            0         0                yes  (shared copy-on-write)
                 1            1         -                no   (file page)
                 0            -         -                no   (absent, swapped)

The kernel's zero page (read, never written) is present, anonymous and never exclusive,
yet it holds no data and a restore leaves it unmapped: it is not counted.

No per-page Python loop: a private VMA's entries are read in chunks of 256 MiB of address
space (512 KiB of entries), the top byte of each entry is classified with one
``bytes.translate`` (ckpt.kernel.pagemap.match_flags) and counted with ``bytes.count``,
and zero pages are told by their frame (ckpt.kernel.pagemap.zero_page_flags). A VMA
larger than 1 GiB, or any VMA when frames are hidden (no CAP_SYS_ADMIN), is first
narrowed by PAGEMAP_SCAN to its present, non-file, non-zero-page regions. 1 GiB of
shared pages: ~9 ms here (with the scan ~13 ms).
"""

from __future__ import annotations

import errno
import os
from array import array
from collections.abc import Iterable

from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.errors import KernelError
from ckpt.kernel.pagemap import (
    PAGE_IS_FILE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PM_EXCLUSIVE,
    PM_FILE,
    PM_PRESENT,
    match_flags,
    pagemap_scan,
    read_pagemap_entries,
    zero_page_flags,
    zero_pfn,
)
from ckpt.kernel.sys import PAGE_SIZE

#: VMAs whose pages a restore writes as private copies (a FILE_PRIVATE VMA's written
#: pages are anonymous; its file pages are left out by the PM_FILE bit)
PRIVATE_KINDS = frozenset({VmaKind.ANON_PRIVATE, VmaKind.HEAP, VmaKind.STACK,
                           VmaKind.FILE_PRIVATE})

WINDOW = 1 << 28  # address space whose entries (512 KiB: cache-sized) are read at once
SCAN_ABOVE = 1 << 30  # larger VMAs: PAGEMAP_SCAN first finds where the pages are

# present, not a file page, not the zero page (PFNZERO: the huge zero page too)
_SCAN_MASK = PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO
_SCAN_INVERTED = PAGE_IS_FILE | PAGE_IS_PFNZERO
_SCAN_WORKS = [True]


def cow_shared_bytes(pid: int, vmas: Iterable[VmaInfo], root: str = "/proc") -> int:
    """Bytes of ``pid``'s private anonymous pages that another process maps too (the
    table above); ``vmas`` as ckpt.collect.vmas.collect_vmas gives them."""
    fd = os.open(f"{root}/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pages = 0
        for v in vmas:
            if v.kind not in PRIVATE_KINDS:
                continue
            regions, scanned = _candidates(fd, v.start, v.end)
            for lo, hi in regions:
                for a in range(lo, hi, WINDOW):
                    entries = read_pagemap_entries(fd, a, min(hi, a + WINDOW))
                    pages += shared_pages(entries, scanned)
        return pages * PAGE_SIZE
    finally:
        os.close(fd)


def shared_pages(entries: array[int], scanned: bool = True) -> int:
    """How many of these pagemap entries are present, anonymous and not exclusively
    mapped. ``scanned``: PAGEMAP_SCAN already left the zero page out; otherwise entries
    mapping it are found by their frame and not counted."""
    flags = match_flags(entries, PM_PRESENT, PM_EXCLUSIVE | PM_FILE)
    count = flags.count(1)
    if count and not scanned:
        count -= (int.from_bytes(flags, "little") & zero_page_flags(entries)).bit_count()
    return count


def _candidates(fd: int, start: int, end: int) -> tuple[list[tuple[int, int]], bool]:
    """The parts of [start, end) whose entries are worth reading, and whether zero pages
    are already left out of them. All of it for a VMA of up to SCAN_ABOVE when this
    process sees frames (reading every entry and telling zero pages by frame costs less
    than a scan: ~9 against ~13 ms for 1 GiB here); otherwise the present anonymous
    regions PAGEMAP_SCAN reports (it skips empty page tables: a sparse reservation of a
    TiB holds 2 GiB of entries), or all of it without PAGEMAP_SCAN (Linux < 6.7)."""
    if (end - start <= SCAN_ABOVE and zero_pfn()) or not _SCAN_WORKS[0]:
        return [(start, end)], False
    try:
        found = pagemap_scan(fd, start, end, category_mask=_SCAN_MASK,
                             category_inverted=_SCAN_INVERTED, return_mask=PAGE_IS_PRESENT)
    except KernelError as exc:
        if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        _SCAN_WORKS[0] = False  # no such ioctl here: read every entry
        return [(start, end)], False
    return [(a, b) for a, b, _ in found], True
