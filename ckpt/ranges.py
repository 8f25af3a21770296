"""Sorted, disjoint address ranges [start, end) and the set operations the page planner
needs. Work is per range, never per page.

    a        : |----|    |--------|
    b        :    |--------|
    a & b    :    |-|    |-|
    a - b    : |--|          |----|
    a | b    : |--------------------|  (merged when touching)
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

Range = tuple[int, int]


def normalize(ranges: Iterable[Range]) -> list[Range]:
    """Sort, drop empty ranges, merge overlapping or touching ones."""
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def merge_sorted(ranges: list[Range]) -> list[Range]:
    """Coalesce touching neighbours of ranges already sorted and disjoint (no sort)."""
    out: list[Range] = []
    for start, end in ranges:
        if out and start == out[-1][1]:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def union(a: list[Range], b: list[Range]) -> list[Range]:
    """a | b. Timsort on two sorted runs is a linear merge in C: faster than heapq."""
    if not a or not b:
        return list(a or b)
    return normalize([*a, *b])


def intersect(a: list[Range], b: list[Range]) -> list[Range]:
    """a ∩ b for normalized inputs."""
    if len(a) < len(b):
        a, b = b, a
    if len(b) * FEW < len(a):
        return _intersect_few(a, b)
    return intersect_walk(a, b)


def intersect_walk(a: list[Range], b: list[Range]) -> list[Range]:
    """a ∩ b by walking both lists side by side."""
    out: list[Range] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


FEW = 16  # intersect: bisect into the longer list when the other is this many times shorter


def _intersect_few(many: list[Range], few: list[Range]) -> list[Range]:
    """intersect() when ``few`` is much shorter (clipping thousands of dirty runs to a few
    VMAs): each of ``few`` takes its slice of ``many`` by bisection, copied in C, and only
    the slice's two ends are clipped."""
    starts = [s for s, _ in many]
    out: list[Range] = []
    for lo, hi in few:
        i = bisect.bisect_right(starts, lo) - 1
        if i < 0 or many[i][1] <= lo:
            i += 1
        j = bisect.bisect_left(starts, hi)
        if i >= j:
            continue
        part = many[i:j]
        part[0] = (max(part[0][0], lo), min(part[0][1], hi))
        part[-1] = (max(part[-1][0], lo), min(part[-1][1], hi))
        out += part
    return out


def subtract(a: list[Range], b: list[Range]) -> list[Range]:
    """a - b for normalized inputs."""
    out: list[Range] = []
    j = 0
    for start, end in a:
        cur = start
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < end:
            out.append((cur, end))
    return out


def clip(a: list[Range], start: int, end: int) -> list[Range]:
    return intersect(a, [(start, end)])


def total(a: Iterable[Range]) -> int:
    return sum(e - s for s, e in a)
