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

Runs are computed from /proc/PID/pagemap a VMA at a time; ``present_runs`` finds run
boundaries without a per-page Python loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.kernel.pagemap import PM_FILE, PM_PRESENT, PM_SWAP, present_runs, read_pagemap_entries
from ckpt.kernel.sys import PAGE_SIZE

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


def runs_for_vma(pagemap_fd: int, vma: VmaInfo) -> list[Run]:
    """Runs of pages of ``vma`` whose contents must be stored in the image."""
    if vma.kind in NO_PAGES:
        return []
    entries = read_pagemap_entries(pagemap_fd, vma.start, vma.end)
    reject = PM_FILE if vma.kind == VmaKind.FILE_PRIVATE else 0
    return [Run(a, n) for a, n in present_runs(entries, vma.start, PM_PRESENT | PM_SWAP, reject)]


def plan_dump(pid: int, vmas: list[VmaInfo], proc_root: str = "/proc") -> list[Run]:
    """Every run to store for a full dump, in address order."""
    fd = os.open(f"{proc_root}/{pid}/pagemap", os.O_RDONLY)
    try:
        return [run for vma in vmas for run in runs_for_vma(fd, vma)]
    finally:
        os.close(fd)
