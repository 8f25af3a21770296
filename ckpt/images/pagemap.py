"""A pass's page index: which pages it stores (PRESENT) and which are unchanged since its
parent (IN_PARENT), in memory as two range lists and on disk as packed arrays.

    memory   : |AAAA|....|BB|CCC|
    Pagemap  : present   = [A, C]          (sorted, disjoint, page aligned)
               in_parent = [B]
    image    : PagemapHead, PagemapRuns{vaddr=[A, B, C], nr_pages=[4, 2, 3],
                                        flags=[PRESENT, IN_PARENT, PRESENT]}
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from ckpt.errors import ImageError
from ckpt.images.pb.image_pb2 import IN_PARENT, PRESENT, PagemapRuns
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.ranges import Range, merge_sorted, normalize

RUNS_PER_ENTRY = 1 << 16


@dataclass(frozen=True)
class Pagemap:
    """Read-only once built: ImageDir.read_pagemap hands the same object to every caller."""

    present: list[Range]
    in_parent: list[Range]

    @functools.cached_property
    def covered(self) -> list[Range]:
        """Pages that exist in this image's view (its own or its parents')."""
        return normalize(self.present + self.in_parent)

    @property
    def runs(self) -> int:
        return len(self.present) + len(self.in_parent)

    def pages(self) -> tuple[int, int]:
        """(pages here, pages in the parent)."""
        return (sum(e - s for s, e in self.present) // PAGE_SIZE,
                sum(e - s for s, e in self.in_parent) // PAGE_SIZE)


def encode(pm: Pagemap) -> list[PagemapRuns]:
    runs = sorted([(s, e, PRESENT) for s, e in pm.present] +
                  [(s, e, IN_PARENT) for s, e in pm.in_parent])
    out = []
    for at in range(0, len(runs), RUNS_PER_ENTRY):
        part = runs[at : at + RUNS_PER_ENTRY]
        out.append(PagemapRuns(vaddr=[s for s, _, _ in part],
                               nr_pages=[(e - s) // PAGE_SIZE for s, e, _ in part],
                               flags=[f for _, _, f in part]))
    return out


def decode(msgs: Sequence[PagemapRuns], name: str) -> Pagemap:
    """The runs of a pagemap image, checked: equal array lengths, known flags, page
    aligned, ascending and disjoint."""
    present: list[Range] = []
    in_parent: list[Range] = []
    end = 0
    for msg in msgs:
        if not len(msg.vaddr) == len(msg.nr_pages) == len(msg.flags):
            raise ImageError(f"{name}: corrupted (run arrays of different lengths)")
        for vaddr, n, flags in zip(msg.vaddr, msg.nr_pages, msg.flags, strict=True):
            if vaddr < end or vaddr % PAGE_SIZE or n == 0:
                raise ImageError(f"{name}: corrupted (run at {vaddr:#x} out of order)")
            end = vaddr + n * PAGE_SIZE
            if flags == PRESENT:
                present.append((vaddr, end))
            elif flags == IN_PARENT:
                in_parent.append((vaddr, end))
            else:
                raise ImageError(f"{name}: corrupted (run at {vaddr:#x} has flags {flags})")
    return Pagemap(merge_sorted(present), merge_sorted(in_parent))
