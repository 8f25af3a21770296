"""The compare backend's dedupe: store only pages whose bytes differ from the parent's.

Each compare image carries an 8-byte digest per page of its view (digests-PID.img):

    view     : |A A A A|      |B B|        covered ranges, in address order
    digests  : [a0 a1 a2 a3    b0 b1]      one per page, same order

A pass digests every existing page, compares with the parent's digest for the same
address, and keeps IN_PARENT only where they are equal. A page that changes between the
digest and the copy (predump, target running) is stored newer than its digest says, so
the next pass sees a mismatch and copies it again: the error is always towards copying.
"""

from __future__ import annotations

import bisect
import hashlib
from itertools import accumulate

from ckpt.kernel.sys import PAGE_SIZE
from ckpt.pagecopy.copy import copy_runs
from ckpt.pagecopy.plan import Run
from ckpt.ranges import Range, normalize

DIGEST = 8
NO_DIGEST = bytes(DIGEST)


def digest_view(view: memoryview) -> bytes:
    """The digests of the pages in ``view``, concatenated."""
    return b"".join(hashlib.blake2b(view[i : i + PAGE_SIZE], digest_size=DIGEST).digest()
                    for i in range(0, len(view), PAGE_SIZE))


def digest_pages(pid: int, ranges: list[Range], tolerate_unmapped: bool = False) -> bytes:
    """One digest per page of ``ranges`` (address order), read from the live process.

    The compare backend is the slow fallback; this is its one per-page loop.
    """
    out: list[bytes] = []

    def sink(view: memoryview) -> None:
        out.append(digest_view(view))

    copy_runs(pid, [Run(s, e - s) for s, e in ranges], sink, tolerate_unmapped=tolerate_unmapped)
    return b"".join(out)


class DigestMap:
    """Digests of an image's view, looked up by address."""

    def __init__(self, ranges: list[Range], blob: bytes) -> None:
        self.ranges = normalize(ranges)
        self.starts = [s for s, _ in self.ranges]
        self.first = [0, *accumulate((e - s) // PAGE_SIZE for s, e in self.ranges)]
        self.blob = blob
        if self.first[-1] * DIGEST != len(blob):
            self.ranges, self.starts, self.blob = [], [], b""  # unusable: compare nothing

    def get(self, addr: int) -> bytes | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0 or addr >= self.ranges[i][1]:
            return None
        k = self.first[i] + (addr - self.ranges[i][0]) // PAGE_SIZE
        return self.blob[k * DIGEST : (k + 1) * DIGEST]


def dedupe(candidates: list[Range], digests: bytes, parent: DigestMap,
           ) -> tuple[list[Range], list[Range]]:
    """Split candidate pages into (changed, same as parent)."""
    changed: list[Range] = []
    same: list[Range] = []
    k = 0
    for start, end in candidates:
        for addr in range(start, end, PAGE_SIZE):
            mine = digests[k * DIGEST : (k + 1) * DIGEST]
            k += 1
            target = same if parent.get(addr) == mine else changed
            if target and target[-1][1] == addr:
                target[-1] = (target[-1][0], addr + PAGE_SIZE)
            else:
                target.append((addr, addr + PAGE_SIZE))
    return changed, same

