"""Bulk page reads from a live process into a sink, through two reusable bounce buffers.

Runs are packed into batches of at most IOV_MAX iovecs and BOUNCE bytes, each read with a
single process_vm_readv; a batch the syscall cannot read (PROT_NONE pages, for instance)
is read again run by run from /proc/PID/mem, which forces access like a debugger does.
A fresh destination buffer per batch would cost more in page faults than the copy itself,
hence pre-faulted buffers, each no larger than the whole copy.

While the sink consumes batch k (compression, on the caller's thread), a helper thread
reads batch k+1 into the other buffer (the syscalls release the GIL):

    reader  : read 0 → A | read 1 → B | read 2 → A | ...
    sink    :            | sink(A)    | sink(B)    | sink(A) ...

The sink must be done with a buffer when it returns (PagesWriter.write is).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from ckpt.errors import CkptError
from ckpt.kernel.sys import IOV_MAX, PAGE_SIZE, vm_transfer
from ckpt.pagecopy.plan import Run

BOUNCE = 64 << 20
MAP_POPULATE = 0x8000


class Bounce:
    """A pre-faulted anonymous buffer and its address."""

    def __init__(self, size: int = BOUNCE) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE)
        self.view = memoryview(self.map)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def close(self) -> None:
        self.view.release()
        # ctypes keeps an export of the buffer alive; let the GC unmap it.


def batches(runs: list[Run], limit: int = BOUNCE) -> Iterator[list[tuple[int, int]]]:
    """Group runs into (vaddr, length) lists of ≤ IOV_MAX entries and ≤ ``limit`` bytes."""
    batch: list[tuple[int, int]] = []
    size = 0
    for run in runs:
        addr, left = run.vaddr, run.length
        while left:
            take = min(left, limit - size)
            batch.append((addr, take))
            size += take
            addr += take
            left -= take
            if size == limit or len(batch) == IOV_MAX:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


class _Reader:
    """Reads batches of ``pid`` into a bounce buffer; /proc/PID/mem as the fallback."""

    def __init__(self, pid: int, proc_root: str, tolerate_unmapped: bool = False) -> None:
        self.pid = pid
        self.proc_root = proc_root
        self.tolerate_unmapped = tolerate_unmapped
        self.mem_fd = -1

    def read(self, bounce: Bounce, batch: list[tuple[int, int]]) -> int:
        """Fill ``bounce`` with ``batch`` back to back; return the bytes read."""
        return self.read_at(bounce.addr, bounce.view, batch)

    def read_at(self, base: int, view: memoryview, batch: list[tuple[int, int]]) -> int:
        """Fill the buffer ``view`` (at address ``base``) with ``batch`` back to back."""
        pairs = []
        off = 0
        for addr, length in batch:
            pairs.append((base + off, addr, length))
            off += length
        try:
            vm_transfer(False, self.pid, pairs)
        except CkptError:  # e.g. PROT_NONE pages: /proc/PID/mem forces access
            if self.mem_fd < 0:
                self.mem_fd = os.open(f"{self.proc_root}/{self.pid}/mem", os.O_RDONLY)
            for local, addr, length in pairs:
                start = local - base
                try:
                    got = os.preadv(self.mem_fd, [view[start : start + length]], addr)
                except OSError:
                    got = -1
                if got != length and self.tolerate_unmapped:
                    # Unmapped while the target ran (predump): zeros here, and the next
                    # pass sees whatever is mapped there now as a new VMA, copied whole.
                    view[start : start + length] = bytes(length)
                elif got != length:
                    raise CkptError(
                        f"short read of {length} bytes at {addr:#x} in {self.pid}") from None
        return off

    def close(self) -> None:
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1


def copy_runs(pid: int, runs: list[Run], sink: Callable[[memoryview], None],
              proc_root: str = "/proc", tolerate_unmapped: bool = False) -> int:
    """Read every run of ``pid`` and pass the bytes, in run order, to ``sink``.

    ``sink`` gets a view of a bounce buffer that is refilled once it returns.
    """
    want = sum(run.length for run in runs)
    if not want:
        return 0
    size = min(BOUNCE, -(-want // PAGE_SIZE) * PAGE_SIZE)
    todo = list(batches(runs, size))
    bounces = [Bounce(size) for _ in range(min(2, len(todo)))]
    reader = _Reader(pid, proc_root, tolerate_unmapped)
    total = 0
    try:
        if len(todo) == 1:
            total = reader.read(bounces[0], todo[0])
            sink(bounces[0].view[:total])
            return total
        with ThreadPoolExecutor(1, thread_name_prefix="ckpt-readv") as pool:
            ahead: Future[int] = pool.submit(reader.read, bounces[0], todo[0])
            try:
                for i in range(len(todo)):
                    off = ahead.result()
                    if i + 1 < len(todo):
                        ahead = pool.submit(reader.read, bounces[(i + 1) % 2], todo[i + 1])
                    sink(bounces[i % 2].view[:off])
                    total += off
            except BaseException:
                ahead.cancel()  # the pool's exit waits for a read already running
                raise
    finally:
        reader.close()
        for bounce in bounces:
            bounce.close()
    return total



def read_into(pid: int, runs: list[Run], buf: bytearray | mmap.mmap,
              tolerate_unmapped: bool = False) -> None:
    """Read every run of ``pid`` back to back straight into ``buf`` (no bounce buffer:
    the fastest way to take a small snapshot while the target is frozen)."""
    if not buf:
        return
    base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    reader = _Reader(pid, "/proc", tolerate_unmapped)
    try:
        reader.read_at(base, memoryview(buf), [(r.vaddr, r.length) for r in runs])
    finally:
        reader.close()
