"""What to dump: VMAs → page runs worth storing (the policy, like CRIU's should_dump_page).

    VMA kind          stored pages
    ---------------   ----------------------------------------------------------------
    anon private      present or swapped            (everything the process wrote/read)
    heap, stack       present or swapped
    file private      present or swapped and not a file page (i.e. COW'd copies only);
                      untouched pages come back from the file at restore
    anon shared       every page of its shmem object that holds data (SEEK_DATA on
                      /proc/PID/map_files/...): also those another member of a tree
                      wrote and this process never touched, and those swapped out
                      (neither shows in this process's pagemap)
    file shared       none: the data lives in the file
    System V shm      none: the whole segment is in the core image (ckpt.collect.sysvshm)
    vdso/vvar/...     none: the kernel provides them

Runs are computed from /proc/PID/pagemap a VMA at a time; ``data_runs`` finds run
boundaries without a per-page Python loop. Two kinds of "present or swapped" hold no data
and are skipped: uffd-wp's PTE markers on never-populated pages (they look like swap
entries), and pages mapping the kernel's shared zero page (read, never written; CRIU
skips them too). Restore leaves both unmapped, and they read as zeros again.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.errors import KernelError
from ckpt.kernel.pagemap import (
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    data_runs,
    pagemap_scan,
    read_pagemap_entries,
)
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.ranges import Range, merge_sorted, normalize

NO_PAGES = frozenset({VmaKind.FILE_SHARED, VmaKind.VDSO, VmaKind.VVAR, VmaKind.VVAR_VCLOCK,
                      VmaKind.VSYSCALL, VmaKind.SYSV_SHM})  # SysV: ckpt.collect.sysvshm


@dataclass(frozen=True)
class Run:
    """``length`` bytes of memory at ``vaddr``, page aligned."""

    vaddr: int
    length: int

    @property
    def nr_pages(self) -> int:
        return self.length // PAGE_SIZE


def existing_pages(pid: int, vmas: list[VmaInfo], proc_root: str = "/proc",
                   ) -> tuple[list[Range], list[Range]]:
    """(exists, present) ranges of every dumpable VMA, from /proc/PID/pagemap."""
    exists: list[Range] = []
    present: list[Range] = []
    fd = os.open(f"{proc_root}/{pid}/pagemap", os.O_RDONLY)
    try:
        for v in vmas:
            if v.kind in NO_PAGES:
                continue
            if v.kind == VmaKind.ANON_SHARED and (data := shmem_data(pid, v, proc_root)) \
                    is not None:
                exists += data
                present += data
                continue
            reject = v.kind == VmaKind.FILE_PRIVATE
            for lo, hi in populated(fd, v.start, v.end):
                e, p = data_runs(read_pagemap_entries(fd, lo, hi), lo, reject_file=reject)
                exists += ((a, a + n) for a, n in e)
                present += ((a, a + n) for a, n in p)
    finally:
        os.close(fd)
    return normalize(exists), normalize(present)


def shmem_data(pid: int, v: VmaInfo, proc_root: str = "/proc") -> list[Range] | None:
    """The pages of shared anonymous VMA ``v`` whose shmem object holds data there, found
    with lseek SEEK_DATA/SEEK_HOLE on the object (/proc/PID/map_files, root only); None
    if it cannot be opened (then the pagemap says what is mapped)."""
    try:
        fd = os.open(f"{proc_root}/{pid}/map_files/{v.start:x}-{v.end:x}",
                     os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    out: list[Range] = []
    lo, hi = v.pgoff, v.pgoff + (v.end - v.start)
    try:
        at = lo
        while at < hi:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after ``at``
                    break
                return None
            if start >= hi:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), hi)
            out.append((v.start + start - lo, v.start + end - lo))
            at = end
    finally:
        os.close(fd)
    return out


SCAN_FIRST = 1 << 30  # VMAs larger than this: PAGEMAP_SCAN finds where the pages are
_SCAN_WORKS = [True]


def populated(fd: int, start: int, end: int) -> list[Range]:
    """The parts of [start, end) whose pagemap entries are worth reading: all of it for
    an ordinary VMA; for a huge one (a sparse reservation of many GiB: ASan shadow,
    runtime heaps) only where PAGEMAP_SCAN sees a present or swap-like page, since its
    walk skips empty page tables and 8 bytes of entries per page would not (1 TiB: 2 GiB
    of entries). Without PAGEMAP_SCAN (Linux < 6.7, not procfs), all of it."""
    if end - start <= SCAN_FIRST or not _SCAN_WORKS[0]:
        return [(start, end)]
    try:
        found = pagemap_scan(fd, start, end, category_anyof_mask=PAGE_IS_PRESENT
                             | PAGE_IS_SWAPPED, return_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
    except KernelError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            _SCAN_WORKS[0] = False  # no such ioctl here: never try again
        return [(start, end)]
    return merge_sorted([(a, b) for a, b, _ in found])


def plan_dump(pid: int, vmas: list[VmaInfo], proc_root: str = "/proc") -> list[Run]:
    """Every run to store for a full dump, in address order."""
    return [Run(s, e - s) for s, e in existing_pages(pid, vmas, proc_root)[0]]
