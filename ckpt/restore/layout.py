"""From one pass's VMA list to the next's, changing as little of a stub as possible.

A warm restore (ckpt.restore.warm) keeps a stub whose memory equals the last pass applied.
The next pass comes with its own VMA list; every address falls in one of three cases:

    old  : |anon A      |file F@0   |anon B |           |
    new  : |anon A   |anon C        |anon B    |anon D  |
    plan : |keep     |fresh         |keep   |fresh     |      (B's tail: grown, fresh)

    keep    the old mapping has the same backing (anonymous private, the same file at the
            same offset, shared or not, grows-down or not, the same MAP_NORESERVE and
            madvise flags): its pages stay, an mprotect fixes the protection if it changed
    fresh   anything else is mapped anew with MAP_FIXED: its old pages are gone, so
            pages the next pass says are unchanged (IN_PARENT) must be refilled there
    unmap   old addresses no new VMA covers

The kernel's own mappings (vdso, vvar, vsyscall) never move and take no part.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ckpt.collect.vmas import KERNEL_PROVIDED, VmaKind
from ckpt.images.pb import core_pb2 as pb
from ckpt.ranges import Range, normalize, subtract
from ckpt.restore.mm import MAP_TIME_FLAGS, warm_prot

ANON = frozenset({VmaKind.ANON_PRIVATE, VmaKind.HEAP, VmaKind.STACK})
FILE = frozenset({VmaKind.FILE_PRIVATE, VmaKind.FILE_SHARED})

Backing = tuple[str, bool, bool, str, int, int, int, tuple[str, ...]]


@dataclass(frozen=True)
class Piece:
    """[start, end) of VMA ``vma``, to be mapped fresh."""

    start: int
    end: int
    vma: pb.Vma


@dataclass
class LayoutChange:
    unmap: list[Range] = field(default_factory=list)
    fresh: list[Piece] = field(default_factory=list)
    protect: list[tuple[int, int, int]] = field(default_factory=list)  # start, end, prot
    kept: list[Range] = field(default_factory=list)

    @property
    def fresh_ranges(self) -> list[Range]:
        return normalize((p.start, p.end) for p in self.fresh)


def backing(v: pb.Vma) -> Backing:
    """What must match for an old mapping's pages to serve a new VMA at the same address.
    For files the offset must line up too: ``start - pgoff`` is the file's base address."""
    kind = VmaKind(v.kind)
    growsdown = kind == VmaKind.STACK and "gd" in v.vmflags
    # what map_range sets besides the mapping itself: an mprotect keeps the old ones
    flags = tuple(f for f in MAP_TIME_FLAGS if f in v.vmflags)
    if kind in ANON:
        return ("anon", v.shared, growsdown, "", 0, 0, 0, flags)
    if kind in FILE:
        return ("file", v.shared, False, v.path, v.dev, v.inode, v.start - v.pgoff, flags)
    return (VmaKind(v.kind).name, v.shared, False, v.path, 0, 0, 0, flags)


def mapped(vmas: list[pb.Vma]) -> list[pb.Vma]:
    """The VMAs a restore maps itself, by address."""
    return sorted((v for v in vmas if VmaKind(v.kind) not in KERNEL_PROVIDED),
                  key=lambda v: v.start)


def plan_layout(old: list[pb.Vma], new: list[pb.Vma]) -> LayoutChange:
    olds, news = mapped(old), mapped(new)
    starts = [o.start for o in olds]
    out = LayoutChange()
    for v in news:
        keep: list[Range] = []
        key, prot = backing(v), warm_prot(v)
        i = max(bisect.bisect_right(starts, v.start) - 1, 0)
        while i < len(olds) and olds[i].start < v.end:
            o = olds[i]
            a, b = max(o.start, v.start), min(o.end, v.end)
            if a < b and backing(o) == key:
                keep.append((a, b))
                if warm_prot(o) != prot:
                    out.protect.append((a, b, prot))
            i += 1
        out.kept += keep
        out.fresh += (Piece(a, b, v) for a, b in subtract([(v.start, v.end)], keep))
    out.kept = normalize(out.kept)
    out.unmap = subtract(normalize((o.start, o.end) for o in olds),
                         normalize((v.start, v.end) for v in news))
    return out


def vdso_moved(old: list[pb.Vma], new: list[pb.Vma]) -> bool:
    def where(vmas: list[pb.Vma]) -> set[tuple[int, int, int]]:
        return {(v.kind, v.start, v.end) for v in vmas if VmaKind(v.kind) in KERNEL_PROVIDED}

    return where(old) != where(new)
