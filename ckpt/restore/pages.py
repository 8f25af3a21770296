"""Fill the restored address space from page images.

The page file is one stream of the PRESENT runs in pagemap order, cut into zstd chunks:

    pagemap : (A, 4 pages) (C, 3 pages)
    stream  : [A A A A C C C]  → chunks [A A A] [A C C] [C]
    writes  : chunk 1 → A[0:3];  chunk 2 → A[3:4], C[0:2];  chunk 3 → C[2:3]

Each chunk becomes one process_vm_writev with an iovec per piece; pieces landing in
VMAs that are not writable (text with COW'd pages) go through /proc/PID/mem instead.
"""

from __future__ import annotations

import bisect
import ctypes
from collections.abc import Iterable

from ckpt.errors import ImageError
from ckpt.images.pb import core_pb2, image_pb2
from ckpt.kernel.sys import PAGE_SIZE, vm_transfer
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

    def writable(self, addr: int) -> bool:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0 or addr >= self.spans[i][1]:
            raise ImageError(f"page at {addr:#x} lies outside every VMA of the image")
        return self.spans[i][2]


def fill_pages(stub: Stub, entries: list[image_pb2.PagemapEntry], chunks: Iterable[bytes],
               index: WritableIndex) -> int:
    """Write the stream of PRESENT runs into the stub; return bytes written."""
    runs = [(e.vaddr, e.nr_pages * PAGE_SIZE) for e in entries
            if e.flags & image_pb2.PagemapEntry.PRESENT]
    run_i, run_off, total = 0, 0, 0
    for chunk in chunks:
        base = ctypes.cast(ctypes.c_char_p(chunk), ctypes.c_void_p).value or 0
        pos, pairs = 0, []
        while pos < len(chunk):
            if run_i >= len(runs):
                raise ImageError("page file holds more data than the pagemap describes")
            vaddr, length = runs[run_i]
            take = min(length - run_off, len(chunk) - pos)
            dest = vaddr + run_off
            if index.writable(dest):
                pairs.append((base + pos, dest, take))
            else:
                stub.write_mem(dest, memoryview(chunk)[pos : pos + take])
            pos += take
            run_off += take
            if run_off == length:
                run_i, run_off = run_i + 1, 0
        if pairs:
            vm_transfer(True, stub.pid, pairs)
        total += len(chunk)
    if run_i != len(runs):
        raise ImageError("page file ends before the pagemap does (truncated image?)")
    return total
