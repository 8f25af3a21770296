"""What an incremental pass stores: VMAs + dirty set + the parent's pages → pagemap.

For every page of a dumpable VMA, with "exists" = present or swapped out (COW'd copies
only, for private file mappings; uffd-wp's PTE markers and the shared zero page are not
data) from pagemap:

    exists, dirty (or its VMA copied whole)      → copy           PRESENT
    exists, clean, the parent has it            → IN_PARENT
    present, clean, the parent lacks it         → copy           (cannot prove it clean)
    anything else                               → hole           zeros on restore

"Swapped, clean, parent lacks it" is a hole: with uffd-wp a protected never-populated page
reads as a swap-like marker, and a page that really was swapped out since the last pass
was present then, so the parent has it. A page dropped by MADV_DONTNEED is "not present":
a hole, never "same as parent" — otherwise restore would resurrect stale data; read
again after that, it maps the zero page and is a hole all the same (soft-dirty sees
neither the drop nor the read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.pagecopy.plan import NO_PAGES, Run, existing_pages
from ckpt.ranges import Range, intersect, normalize, subtract, total, union
from ckpt.track.base import DirtySet

ANON_KINDS = frozenset({VmaKind.ANON_PRIVATE, VmaKind.HEAP, VmaKind.STACK})


@dataclass
class PassPlan:
    copy: list[Range]  # stored in this image (PRESENT)
    in_parent_now: list[Range]  # unchanged, resolved through the parent (IN_PARENT) ...
    scanned_pages: int = 0
    whole: list[tuple[int, int, str]] = field(default_factory=list)
    precopied: int = 0  # pages of ``copy`` read before the freeze (ckpt.pagecopy.staging)
    # ... plus these, worked out only when first needed: it is pure range arithmetic on
    # what was read while frozen, so a --leave-running dump does it after the thaw.
    in_parent_later: Callable[[], list[Range]] | None = None

    @property
    def in_parent(self) -> list[Range]:
        if self.in_parent_later is not None:
            self.in_parent_now = union(self.in_parent_now, self.in_parent_later())
            self.in_parent_later = None
        return self.in_parent_now

    @in_parent.setter
    def in_parent(self, value: list[Range]) -> None:
        self.in_parent_now, self.in_parent_later = value, None

    def copy_runs(self) -> list[Run]:
        return [Run(s, e - s) for s, e in self.copy]


def plan_pass(pid: int, vmas: list[VmaInfo], dirty: DirtySet, parent_has: list[Range] | None,
              ) -> PassPlan:
    dumpable = [v for v in vmas if v.kind not in NO_PAGES]
    scanned = sum(v.length for v in dumpable) // PAGE_SIZE
    if parent_has is None or dirty.all_dirty:
        exists, _ = existing_pages(pid, dumpable)
        why = dirty.whole
        if parent_has is not None and not dirty.compare:  # say why nothing is in parent
            known = {(s, e) for s, e, _ in why}
            why = why + [(v.start, v.end, dirty.all_dirty) for v in dumpable
                         if (v.start, v.end) not in known]
        return PassPlan(copy=exists, in_parent_now=[], scanned_pages=scanned, whole=why)
    whole = normalize((s, e) for s, e, _ in dirty.whole)
    changed = union(dirty.dirty, whole) if whole else dirty.dirty
    cheap = [v for v in dumpable if dirty.tracks_existence and v.kind in ANON_KINDS]
    full = [v for v in dumpable if not (dirty.tracks_existence and v.kind in ANON_KINDS)]
    full_mapped = normalize((v.start, v.end) for v in full)
    copy, in_parent = _by_existence(pid, full, intersect(changed, full_mapped),
                                    intersect(parent_has, full_mapped))
    if cheap:
        # Anonymous memory under uffd-wp: a page never gains or loses data without a
        # write or a whole-VMA copy (MADV_DONTNEED reads as written; a read fault maps
        # zeros), and the tracker's own scans said which changed pages hold data: no
        # pagemap read here, and the cost follows the dirty pages, not memory size.
        # Not so for private file mappings: MADV_DONTNEED there drops a COW'd copy back
        # to the file's page unseen, so they take the full check above.
        mapped = normalize((v.start, v.end) for v in cheap)
        copy = union(copy, intersect(dirty.changed_data, mapped))
        scanned = total(full_mapped) // PAGE_SIZE + pages(changed)
        return PassPlan(copy=copy, in_parent_now=in_parent, scanned_pages=scanned,
                        whole=dirty.whole, in_parent_later=lambda: subtract(
                            intersect(parent_has, mapped), changed))
    return PassPlan(copy=copy, in_parent_now=in_parent, scanned_pages=scanned,
                    whole=dirty.whole)


def _by_existence(pid: int, vmas: list[VmaInfo], changed: list[Range], parent_has: list[Range],
                  ) -> tuple[list[Range], list[Range]]:
    """(copy, in_parent) for ``vmas`` from a full read of their pagemap (table above)."""
    exists, present = existing_pages(pid, vmas)
    clean = subtract(exists, changed)
    in_parent = intersect(clean, parent_has)
    unproven = subtract(subtract(present, changed), parent_has)
    return union(intersect(exists, changed), unproven), in_parent


def pages(ranges: list[Range]) -> int:
    return total(ranges) // PAGE_SIZE
