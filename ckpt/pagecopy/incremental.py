"""What an incremental pass stores: VMAs + dirty set + the parent's pages → pagemap.

For every page of a dumpable VMA, with "exists" = present or swapped out (COW'd copies
only, for private file mappings; uffd-wp's PTE markers are not data) from pagemap:

    exists, dirty (or its VMA copied whole)      → copy           PRESENT
    exists, clean, the parent has it            → IN_PARENT
    present, clean, the parent lacks it         → copy           (cannot prove it clean)
    anything else                               → hole           zeros on restore

"Swapped, clean, parent lacks it" is a hole: with uffd-wp a protected never-populated page
reads as a swap-like marker, and a page that really was swapped out since the last pass
was present then, so the parent has it. A page dropped by MADV_DONTNEED is "not present":
a hole, never "same as parent" — otherwise restore would resurrect stale data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckpt.collect.vmas import VmaInfo
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.pagecopy.plan import NO_PAGES, Run, existing_pages
from ckpt.ranges import Range, intersect, normalize, subtract, total, union
from ckpt.track.base import DirtySet


@dataclass
class PassPlan:
    copy: list[Range]  # stored in this image (PRESENT)
    in_parent: list[Range]  # unchanged, resolved through the parent (IN_PARENT)
    scanned_pages: int = 0
    whole: list[tuple[int, int, str]] = field(default_factory=list)

    def copy_runs(self) -> list[Run]:
        return [Run(s, e - s) for s, e in self.copy]


def plan_pass(pid: int, vmas: list[VmaInfo], dirty: DirtySet, parent_has: list[Range] | None,
              ) -> PassPlan:
    exists, present = existing_pages(pid, vmas)
    scanned = sum(v.length for v in vmas if v.kind not in NO_PAGES) // PAGE_SIZE
    if parent_has is None or dirty.all_dirty:
        return PassPlan(copy=exists, in_parent=[], scanned_pages=scanned, whole=dirty.whole)
    changed = union(dirty.dirty, normalize((s, e) for s, e, _ in dirty.whole))
    clean = subtract(exists, changed)
    in_parent = intersect(clean, parent_has)
    unproven = subtract(subtract(present, changed), parent_has)
    copy = union(intersect(exists, changed), unproven)
    return PassPlan(copy=copy, in_parent=in_parent, scanned_pages=scanned, whole=dirty.whole)


def pages(ranges: list[Range]) -> int:
    return total(ranges) // PAGE_SIZE
