"""Bulk page reads from a live process into a sink, through one reusable bounce buffer.

Runs are packed into batches of at most IOV_MAX iovecs and BOUNCE bytes, each read with a
single process_vm_readv; a batch the syscall cannot read (PROT_NONE pages, for instance)
is read again run by run from /proc/PID/mem, which forces access like a debugger does.
A fresh destination buffer per batch would cost more in page faults than the copy itself,
hence the single pre-faulted buffer.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable, Iterator

from ckpt.errors import CkptError
from ckpt.kernel.sys import IOV_MAX, vm_transfer
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


def copy_runs(pid: int, runs: list[Run], sink: Callable[[memoryview], None],
              proc_root: str = "/proc") -> int:
    """Read every run of ``pid`` and pass the bytes, in run order, to ``sink``."""
    bounce = Bounce()
    mem_fd = -1
    total = 0
    try:
        for batch in batches(runs, bounce.size):
            pairs = []
            off = 0
            for addr, length in batch:
                pairs.append((bounce.addr + off, addr, length))
                off += length
            try:
                vm_transfer(False, pid, pairs)
            except CkptError:  # e.g. PROT_NONE pages: /proc/PID/mem forces access
                if mem_fd < 0:
                    mem_fd = os.open(f"{proc_root}/{pid}/mem", os.O_RDONLY)
                for local, addr, length in pairs:
                    start = local - bounce.addr
                    got = os.preadv(mem_fd, [bounce.view[start : start + length]], addr)
                    if got != length:
                        raise CkptError(
                            f"short read of {length} bytes at {addr:#x} in {pid}") from None
            sink(bounce.view[:off])
            total += off
    finally:
        if mem_fd >= 0:
            os.close(mem_fd)
        bounce.close()
    return total
