"""What to dump: VMAs → page runs worth storing (the policy, like CRIU's should_dump_page).

    VMA kind          stored pages
    ---------------   ----------------------------------------------------------------
    anon private      present or swapped            (everything the process wrote/read)
    heap, stack       present or swapped
    file private      present or swapped and not a file page (i.e. COW'd copies only);
                      untouched pages come back from the file at restore
    anon shared       present or swapped (pages of the shmem object that are mapped)
    file shared       none: the data lives in the file
    vdso/vvar/...     none: the kernel provides them

Runs are computed from /proc/PID/pagemap a VMA at a time; ``data_runs`` finds run
boundaries without a per-page Python loop. Two kinds of "present or swapped" hold no data
and are skipped: uffd-wp's PTE markers on never-populated pages (they look like swap
entries), and pages mapping the kernel's shared zero page (read, never written; CRIU
skips them too). Restore leaves both unmapped, and they read as zeros again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.kernel.pagemap import data_runs, read_pagemap_entries
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.ranges import Range, normalize

NO_PAGES = frozenset({VmaKind.FILE_SHARED, VmaKind.VDSO, VmaKind.VVAR, VmaKind.VVAR_VCLOCK,
                      VmaKind.VSYSCALL})


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
            reject = v.kind == VmaKind.FILE_PRIVATE
            e, p = data_runs(read_pagemap_entries(fd, v.start, v.end), v.start,
                             reject_file=reject)
            exists += ((a, a + n) for a, n in e)
            present += ((a, a + n) for a, n in p)
    finally:
        os.close(fd)
    return normalize(exists), normalize(present)


def plan_dump(pid: int, vmas: list[VmaInfo], proc_root: str = "/proc") -> list[Run]:
    """Every run to store for a full dump, in address order."""
    return [Run(s, e - s) for s, e in existing_pages(pid, vmas, proc_root)[0]]
