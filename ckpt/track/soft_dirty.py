"""Soft-dirty: the kernel's own tracker (CONFIG_MEM_SOFT_DIRTY), the seed's mechanism.

    arm     write "4" to /proc/PID/clear_refs: clears every soft-dirty bit and VM_SOFTDIRTY
    read    pagemap bit 55 per page; smaps VmFlags "sd" per VMA
Pages a VMA had before it was unmapped and mapped again in place (or grown) have no PTEs
left to carry bits, so the kernel marks the VMA VM_SOFTDIRTY ("sd") and every page of it
reads soft-dirty: the dumper copies the whole VMA. pagemap must be read *before* the next
clear, which forgets it. Hugetlb PTEs are never cleared: hugetlb VMAs are always whole.
"""

from __future__ import annotations

import os

from ckpt.collect.vmas import VmaInfo
from ckpt.errors import KernelError
from ckpt.kernel.pagemap import PM_SOFT_DIRTY, present_runs, read_pagemap_entries
from ckpt.pagecopy.plan import NO_PAGES, populated
from ckpt.ranges import normalize
from ckpt.track.base import DirtySet, PassContext, Tracker

CLEAR_SOFT_DIRTY = b"4"


class SoftDirtyTracker(Tracker):
    name = "soft-dirty"
    needs_fresh_vmflags = True

    def _begin(self, ctx: PassContext) -> DirtySet:
        lost = self.continuity()
        out = DirtySet(all_dirty=lost)
        if not lost:
            out.dirty, out.whole = self._read(ctx.vmas)
        self._clear()
        return out

    def _read(self, vmas: list[VmaInfo]) -> tuple[list[tuple[int, int]],
                                                   list[tuple[int, int, str]]]:
        dirty: list[tuple[int, int]] = []
        whole: list[tuple[int, int, str]] = []
        fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)
        try:
            for v in vmas:
                if v.kind in NO_PAGES:
                    continue
                if "ht" in v.vmflags:
                    whole.append((v.start, v.end, "hugetlb: soft-dirty is not cleared"))
                elif "sd" in v.vmflags:
                    whole.append((v.start, v.end, "VM_SOFTDIRTY: new, grown or remapped VMA"))
                else:  # only a none PTE has no soft-dirty bit to show: skip those
                    for lo, hi in populated(fd, v.start, v.end):
                        entries = read_pagemap_entries(fd, lo, hi)
                        dirty += present_runs(entries, lo, PM_SOFT_DIRTY)
        finally:
            os.close(fd)
        return normalize((a, a + n) for a, n in dirty), whole

    def _clear(self) -> None:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "wb") as f:
                f.write(CLEAR_SOFT_DIRTY)
        except OSError as exc:
            raise KernelError(exc.errno or 5, f"clear_refs of {self.pid}") from None
