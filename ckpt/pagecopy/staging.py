"""One incremental dump layer read in two steps: most pages while the target still runs
(the live pass), the few written since then while it is frozen.

The live pass is a predump that is never written out: the tracker reports what changed
since the parent and re-arms, and those pages are read while the target runs. The frozen
pass is then planned against the live pass as if it were a parent layer, and the two
plans merge into what restoring the chain  parent <- live <- frozen  would give, as one
layer over the real parent:

    copy       frozen.copy | (frozen.in_parent & live.copy)     newest bytes win
    in parent  frozen.in_parent - live.copy

A page the live pass read and nobody wrote since (the tracker re-armed before the read)
holds the same bytes now; one written since is in frozen.copy; one dropped or unmapped
since is in neither frozen list, so it is gone from the merged layer too.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from ckpt.errors import CkptError
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.pagecopy.incremental import PassPlan
from ckpt.ranges import Range, intersect, subtract, total, union

Snapshot = memoryview  # pages read back to back, exactly their size


@dataclass
class Snap:
    """The pages of ``ranges`` (sorted, disjoint, maximal) back to back in ``buf``."""

    ranges: list[Range]
    buf: Snapshot

    def __post_init__(self) -> None:
        self._starts = [s for s, _ in self.ranges]
        self._offsets = list(itertools.accumulate((e - s for s, e in self.ranges), initial=0))

    def view(self, start: int, end: int) -> memoryview:
        """The bytes of [start, end), which must lie inside one of ``ranges``."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or end > self.ranges[i][1]:
            raise CkptError(f"internal: {start:#x}-{end:#x} is not in the snapshot")
        at = self._offsets[i] + start - self.ranges[i][0]
        return self.buf[at : at + end - start]


def merge_plans(live: PassPlan, frozen: PassPlan) -> PassPlan:
    """One plan over the real parent from a live pass and the frozen pass after it (the
    frozen one planned with ``live_coverage(live)`` as its parent's pages)."""
    from_live = intersect(frozen.in_parent, live.copy)
    return PassPlan(copy=union(frozen.copy, from_live) if from_live else frozen.copy,
                    in_parent_now=subtract(frozen.in_parent, live.copy),
                    scanned_pages=frozen.scanned_pages, whole=_once(live.whole + frozen.whole),
                    precopied=total(from_live) // PAGE_SIZE)


def _once(whole: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Whole-VMA copies of both passes, a range reported by both listed once."""
    seen: dict[Range, str] = {}
    for s, e, why in whole:
        seen.setdefault((s, e), why)
    return [(s, e, why) for (s, e), why in seen.items()]


def live_coverage(live: PassPlan) -> list[Range]:
    """What the live pass's layer would hold or resolve: the frozen pass's 'parent'."""
    return union(live.copy, live.in_parent)


def assemble(copy: list[Range], newer: Snap, older: Snap) -> Iterator[memoryview]:
    """The bytes of ``copy`` in address order, each page from the newer snapshot if it has
    it, else from the older one (which must)."""
    mine = intersect(copy, newer.ranges)
    rest = subtract(copy, newer.ranges)
    theirs = intersect(rest, older.ranges)
    if total(theirs) != total(rest):
        raise CkptError("internal: pages to store that neither pass read")
    pieces = heapq.merge(((s, e, newer) for s, e in mine), ((s, e, older) for s, e in theirs))
    for start, end, snap in pieces:
        yield snap.view(start, end)
