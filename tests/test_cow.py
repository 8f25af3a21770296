"""ckpt.collect.cow: private pages a process still shares copy-on-write (after fork)."""

from __future__ import annotations

import dataclasses
from array import array
from pathlib import Path

import pytest
from conftest import PYTHON, Harness, wait_for_line

from ckpt.collect import cow
from ckpt.collect.cow import cow_shared_bytes, shared_pages
from ckpt.collect.vmas import VmaInfo, collect_vmas
from ckpt.kernel.pagemap import PM_EXCLUSIVE, PM_FILE, PM_PRESENT, PM_SWAP, zero_pfn

MiB = 1 << 20

# 64 MiB of private memory, every page written, and 4 MiB only read (the zero page);
# then a fork. The child writes the first half of the 64 MiB when GO appears.
FORKER = """
import ctypes, mmap, os, sys, time
size, zeros, go = 64 << 20, 4 << 20, sys.argv[1]
data = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
data.write(b"\\1" * size)
read_only = mmap.mmap(-1, zeros, flags=mmap.MAP_PRIVATE)
assert not any(read_only[i] for i in range(0, zeros, 4096))
addr = ctypes.addressof(ctypes.c_char.from_buffer(data))
zaddr = ctypes.addressof(ctypes.c_char.from_buffer(read_only))
if os.fork():
    while True:
        time.sleep(1)
print("child", os.getpid(), addr, zaddr, flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
data[: size // 2] = b"\\2" * (size // 2)
print("written", flush=True)
while True:
    time.sleep(1)
"""


def read_all(m: pytest.MonkeyPatch) -> None:
    """Every entry read, zero pages by frame (VMAs up to SCAN_ABOVE, as root)."""
    m.setattr(cow, "SCAN_ABOVE", 1 << 30)
    m.setattr(cow, "_SCAN_WORKS", [True])


def scan_first(m: pytest.MonkeyPatch) -> None:
    """PAGEMAP_SCAN first (larger VMAs; any VMA when frames are hidden)."""
    m.setattr(cow, "SCAN_ABOVE", 0)
    m.setattr(cow, "_SCAN_WORKS", [True])


def no_scan(m: pytest.MonkeyPatch) -> None:
    """A kernel without PAGEMAP_SCAN."""
    m.setattr(cow, "SCAN_ABOVE", 0)
    m.setattr(cow, "_SCAN_WORKS", [False])


WAYS = (read_all, scan_first, no_scan)


def only(vmas: list[VmaInfo], start: int, length: int) -> list[VmaInfo]:
    """The VMA holding [start, start + length), cut to exactly that range (anonymous
    neighbours may have merged with it)."""
    (v,) = [v for v in vmas if v.start <= start < v.end]
    return [dataclasses.replace(v, start=start, end=start + length)]


def test_forked_child_shares_until_written(harness: Harness, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A child forked after its parent wrote 64 MiB shares all of it; once the child
    wrote half, each side shares the other half only. Read-only pages (the zero page)
    never count. Each way of reading the pagemap (WAYS) gives the same."""
    script, go, out = tmp_path / "forker.py", tmp_path / "go", tmp_path / "out"
    script.write_text(FORKER)
    parent = harness.launch([PYTHON, script, go], out).pid
    line = wait_for_line(out, lambda s: s.startswith("child "), 30, "the child's line")
    child, addr, zaddr = map(int, line.split()[1:])
    harness.track(child)

    def shared(pid: int) -> tuple[int, int, int]:
        vmas = collect_vmas(pid)
        return (cow_shared_bytes(pid, only(vmas, addr, 64 * MiB)),
                cow_shared_bytes(pid, only(vmas, zaddr, 4 * MiB)),
                cow_shared_bytes(pid, vmas))

    for way in WAYS:
        way(monkeypatch)
        data, zeros, whole = shared(child)
        assert (data, zeros) == (64 * MiB, 0), way
        assert 64 * MiB <= whole < 96 * MiB, way  # and the interpreter's own pages
    go.touch()
    wait_for_line(out, lambda s: s == "written", 30, "written")
    for way in WAYS:
        way(monkeypatch)
        for pid in (child, parent):
            data, zeros, whole = shared(pid)
            assert (data, zeros) == (32 * MiB, 0), (way, pid)
            assert 32 * MiB <= whole < 64 * MiB, (way, pid)


def test_shared_pages_counts_present_anonymous_not_exclusive() -> None:
    entries = array("Q", [
        PM_PRESENT | 0x1234,                    # shared copy-on-write: counted
        PM_PRESENT | PM_EXCLUSIVE | 0x1235,     # written since the fork
        PM_PRESENT | PM_FILE | 0x1236,          # a page cache page
        PM_SWAP | 0x40,                         # swapped out: unknown, not counted
        0,                                      # never touched
        PM_PRESENT | 0x1237,                    # counted
    ])
    assert shared_pages(entries) == 2
    assert shared_pages(array("Q")) == 0


def test_zero_page_is_not_counted_without_the_scan() -> None:
    pfn = zero_pfn()
    if not pfn:
        pytest.skip("frames are hidden here (no CAP_SYS_ADMIN): the zero page cannot be told")
    entries = array("Q", [PM_PRESENT | pfn, PM_PRESENT | (pfn + 1)])
    assert shared_pages(entries, scanned=False) == 1
    assert shared_pages(entries, scanned=True) == 2  # the scan left zero pages out already
