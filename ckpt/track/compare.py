"""Compare: for kernels with neither soft-dirty nor uffd-wp (older kernels, other
architectures). Nothing is armed; every page that exists is read and compared with the
parent's bytes, and only pages that differ are stored. Slower, always correct."""

from __future__ import annotations

from ckpt.track.base import DirtySet, PassContext, Tracker


class CompareTracker(Tracker):
    name = "compare"
    begin_needs_freeze = False
    arms = False

    def _begin(self, ctx: PassContext) -> DirtySet:
        return DirtySet(all_dirty="compare backend: every page is compared with the parent",
                        compare=True)
