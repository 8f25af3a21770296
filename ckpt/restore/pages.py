"""Fill the restored address space from page images.

The page file is one stream of the PRESENT runs in pagemap order, cut into zstd chunks:

    pagemap : (A, 4 pages) (C, 3 pages)
    stream  : [A A A A C C C]  → chunks [A A A] [A C C] [C]
    writes  : chunk 1 → A[0:3];  chunk 2 → A[3:4], C[0:2];  chunk 3 → C[2:3]

Each chunk becomes one process_vm_writev with an iovec per piece; pieces landing in
VMAs that are not writable (text with COW'd pages) go through /proc/PID/mem instead.
With a parent chain every image's stream is read in turn and only the pieces that image
*owns* (ckpt.images.chain) are written; the rest of its stream is skipped.
"""

from __future__ import annotations

import bisect
import ctypes
from collections.abc import Callable, Iterable

from ckpt.errors import ImageError
from ckpt.images.pb import core_pb2
from ckpt.kernel.sys import vm_transfer
from ckpt.ranges import Range
from ckpt.restore.stub import Stub

PROT_WRITE = 2


class WritableIndex:
    """Which addresses are writable in the stub while pages are filled."""

    def __init__(self, vmas: list[core_pb2.Vma], late: list[core_pb2.Vma]) -> None:
        late_starts = {v.start for v in late}
        spans = sorted((v.start, v.end, bool(v.prot & PROT_WRITE or v.start in late_starts))
                       for v in vmas)
        self.starts = [s for s, _, _ in spans]
        self.spans = spans

    def split(self, lo: int, hi: int) -> list[tuple[int, int, bool]]:
        """[lo, hi) cut at VMA boundaries, each piece with whether it is writable (a run
        of the image may span neighbouring VMAs of different protections)."""
        out = []
        i = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            if i < 0 or lo >= self.spans[i][1]:
                raise ImageError(f"page at {lo:#x} lies outside every VMA of the image")
            end = min(hi, self.spans[i][1])
            out.append((lo, end, self.spans[i][2]))
            lo, i = end, i + 1
        return out


def fill_pages(stub: Stub, stream: list[Range], chunks: Iterable[tuple[int, bytes | None]],
               index: WritableIndex, owned: list[Range] | None = None) -> int:
    """Write the page stream (the PRESENT runs ``stream``, in order) into the stub; with
    ``owned``, only the parts inside it. ``chunks`` are (length, bytes), bytes None for a
    chunk skipped unread (see chunk_filter). Returns the bytes written."""
    wanted = Wanted(owned)
    run_i, run_off, written = 0, 0, 0
    for length, chunk in chunks:
        if chunk is None:  # none of it is wanted: just move along the stream
            while length:
                if run_i >= len(stream):
                    raise ImageError("page file holds more data than the pagemap describes")
                start, end = stream[run_i]
                take = min(end - start - run_off, length)
                length -= take
                run_off += take
                if start + run_off == end:
                    run_i, run_off = run_i + 1, 0
            continue
        base = ctypes.cast(ctypes.c_char_p(chunk), ctypes.c_void_p).value or 0
        pos, pairs = 0, []
        while pos < len(chunk):
            if run_i >= len(stream):
                raise ImageError("page file holds more data than the pagemap describes")
            start, end = stream[run_i]
            take = min(end - start - run_off, len(chunk) - pos)
            dest = start + run_off
            for piece_lo, piece_hi in wanted.pieces(dest, dest + take):
                for lo, hi, writable in index.split(piece_lo, piece_hi):
                    at = pos + lo - dest
                    if writable:
                        pairs.append((base + at, lo, hi - lo))
                    else:
                        stub.write_mem(lo, memoryview(chunk)[at : at + hi - lo])
                    written += hi - lo
            pos += take
            run_off += take
            if start + run_off == end:
                run_i, run_off = run_i + 1, 0
        if pairs:
            vm_transfer(True, stub.pid, pairs)
    if run_i != len(stream):
        raise ImageError("page file ends before the pagemap does (truncated image?)")
    return written


def chunk_filter(stream: list[Range], owned: list[Range]) -> Callable[[int, int], bool]:
    """Whether the stream's bytes [offset, offset + length) hold any owned page: a parent
    image owns few of its pages in a long chain, and the rest need not be decompressed."""
    offsets: list[int] = []  # stream offset of each run's start
    at = 0
    for s, e in stream:
        offsets.append(at)
        at += e - s
    spans: list[Range] = []  # owned pages as stream offsets (owned lies inside stream)
    for lo, hi in owned:
        i = bisect.bisect_right(stream, (lo, 1 << 64)) - 1
        while lo < hi:
            if i < 0 or i >= len(stream) or not stream[i][0] <= lo < stream[i][1]:
                raise ImageError(f"owned page {lo:#x} is not in the image's page stream")
            end = min(hi, stream[i][1])
            spans.append((offsets[i] + lo - stream[i][0], offsets[i] + end - stream[i][0]))
            lo, i = end, i + 1
    ends = [e for _, e in spans]  # ascending: the spans are sorted and disjoint

    def want(offset: int, length: int) -> bool:
        k = bisect.bisect_right(ends, offset)  # the first span ending after offset
        return k < len(spans) and spans[k][0] < offset + length

    return want


class Wanted:
    """Clips ascending address pieces to the owned ranges (None: everything is wanted)."""

    def __init__(self, owned: list[Range] | None) -> None:
        self.owned = owned
        self.i = 0

    def pieces(self, lo: int, hi: int) -> list[Range]:
        if self.owned is None:
            return [(lo, hi)]
        owned, out = self.owned, []
        while self.i < len(owned) and owned[self.i][1] <= lo:
            self.i += 1
        k = self.i
        while k < len(owned) and owned[k][0] < hi:
            a, b = max(lo, owned[k][0]), min(hi, owned[k][1])
            if a < b:
                out.append((a, b))
            k += 1
        return out
