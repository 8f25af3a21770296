"""Fill the restored address space from page images.

The page file is one stream of the PRESENT runs in pagemap order, cut into zstd chunks:

    pagemap : (A, 4 pages) (C, 3 pages)
    stream  : [A A A A C C C]  → chunks [A A A] [A C C] [C]
    writes  : chunk 1 → A[0:3];  chunk 2 → A[3:4], C[0:2];  chunk 3 → C[2:3]

Each chunk becomes one process_vm_writev with an iovec per piece; pieces landing in
VMAs that are not writable (text with COW'd pages) go through /proc/PID/mem instead, and
pieces in VMAs registered with a CopyFill (fresh anonymous memory) are UFFDIO_COPYed.
Chunks are independent: several threads each decompress one and write it, in any order.
With a parent chain every image's stream is read in turn and only the pieces that image
*owns* (ckpt.images.chain) are written; the rest of its stream is skipped.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable

from ckpt.errors import ImageError
from ckpt.images.pages_reader import PagesReader
from ckpt.images.pb import core_pb2
from ckpt.kernel.sys import vm_transfer
from ckpt.ranges import Range, intersect
from ckpt.restore.stub import Stub
from ckpt.restore.uffd_fill import CopyFill

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


class StreamMap:
    """Where the page stream's bytes go: the PRESENT runs back to back, in order."""

    def __init__(self, stream: list[Range]) -> None:
        self.stream = stream
        self.offsets = list(itertools.accumulate((e - s for s, e in stream), initial=0))
        self.total = self.offsets[-1]

    def pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(address, end, offset in the chunk) of the stream bytes [offset, +length)."""
        if offset + length > self.total:
            raise ImageError("page file holds more data than the pagemap describes")
        out = []
        i = bisect.bisect_right(self.offsets, offset) - 1
        pos, stop = offset, offset + length
        while pos < stop:
            start, end = self.stream[i]
            lo = start + pos - self.offsets[i]
            hi = min(end, lo + stop - pos)
            out.append((lo, hi, pos - offset))
            pos += hi - lo
            i += 1
        return out


def fill_pages(stub: Stub, stream: list[Range], reader: PagesReader, index: WritableIndex,
               owned: list[Range] | None = None, copier: CopyFill | None = None) -> int:
    """Write the page stream (the PRESENT runs ``stream``, in order) into the stub; with
    ``owned``, only the parts inside it (chunks without any are not even decompressed);
    the pieces in ``copier``'s VMAs with UFFDIO_COPY.
    Chunks are decompressed and written on several threads at once: process_vm_writev
    needs no ptrace, and the stub's page faults are taken in parallel too. Returns the
    bytes written."""
    where = StreamMap(stream)
    written: list[int] = []
    stub.mem_fd()  # opened once, before the threads share it

    def sink(offset: int, chunk: memoryview, base: int) -> None:
        pieces = where.pieces(offset, len(chunk))
        if owned is not None:
            pieces = clip(pieces, owned)
        pairs, n = [], 0
        for lo, hi, at in pieces:
            for a, b, writable in index.split(lo, hi):
                if copier is not None and copier.owns(a):
                    copier.copy(a, base + at + a - lo, b - a)
                elif writable:
                    pairs.append((base + at + a - lo, a, b - a))
                else:
                    stub.write_mem(a, chunk[at + a - lo : at + b - lo])
                n += b - a
        if pairs:
            vm_transfer(True, stub.pid, pairs)
        written.append(n)

    total = reader.apply(sink, None if owned is None else chunk_filter(where, owned))
    if total != where.total:
        raise ImageError("page file ends before the pagemap does (truncated image?)")
    return sum(written)


def clip(pieces: list[tuple[int, int, int]], owned: list[Range]) -> list[tuple[int, int, int]]:
    """The parts of ascending (address, end, offset) pieces inside ``owned``."""
    los = [lo for lo, _, _ in pieces]
    out = []
    for a, b in intersect([(lo, hi) for lo, hi, _ in pieces], owned):
        lo, _, at = pieces[bisect.bisect_right(los, a) - 1]
        out.append((a, b, at + a - lo))
    return out


def chunk_filter(where: StreamMap, owned: list[Range]) -> Callable[[int, int], bool]:
    """Whether the stream's bytes [offset, offset + length) hold any owned page: a parent
    image owns few of its pages in a long chain, and the rest need not be decompressed."""
    stream, offsets = where.stream, where.offsets
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
