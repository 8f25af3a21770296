"""A target whose memory is mostly *read* but never written: the shared zero page.

    zeropages.py [--mib N]

It maps N MiB (default 16) of anonymous memory, reads every page (each read fault maps
the kernel's zero page: present, yet no data), writes every 8th page with a pattern, and
prints `layout addr=<hex> size=<n> huge=<hex>`: ``huge`` is a second region of 8 MiB,
MADV_HUGEPAGE, only ever read (with THP, each 2 MiB extent maps the huge zero page).
Then, every 50 ms, a line

    tick=<k> phase=<p> sha=<sha256 of the region> rss=<KiB of the region in RAM>

On SIGUSR1 it moves to the next phase: page 0 (written) is dropped with MADV_DONTNEED and
read again (now the zero page: must read zeros, never the old pattern), and page 1 (read
only so far) gets a pattern. `phase=<p> done` follows. The region's sha and rss are a
function of the phase only, so a restored copy must print what the original would.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import mmap
import signal
import sys
import time

PAGE = mmap.PAGESIZE
HUGE = 8 << 20


def pattern(page: int, phase: int) -> bytes:
    return (f"page {page} phase {phase} ".encode() * PAGE)[:PAGE]


def region_rss_kib(addr: int) -> int:
    """Rss of the VMA starting at ``addr``, from /proc/self/smaps (the zero page is not
    counted: it is nobody's memory)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                inside = int(head.split("-")[0], 16) == addr
            elif inside and head == "Rss:":
                return int(line.split()[1])
    return -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=16)
    size = ap.parse_args().mib << 20
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)  # one zero page per 4 KiB, not a huge zero page
    view = memoryview(m)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    for off in range(0, size, PAGE):
        _ = view[off]  # read fault: the zero page
    for page in range(0, size // PAGE, 8):
        m[page * PAGE : (page + 1) * PAGE] = pattern(page, 0)
    phase = [0, 0]  # current, asked for

    def on_usr1(signo: int, frame: object) -> None:
        phase[1] += 1

    signal.signal(signal.SIGUSR1, on_usr1)
    h = mmap.mmap(-1, HUGE + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    h_addr = ctypes.addressof(ctypes.c_char.from_buffer(h))
    lead = -h_addr % (2 << 20)  # 2 MiB aligned, so whole extents can take huge pages
    h.madvise(mmap.MADV_HUGEPAGE, lead, HUGE)
    hview = memoryview(h)
    for off in range(lead, lead + HUGE, PAGE):
        _ = hview[off]
    print(f"layout addr={addr:x} size={size} huge={h_addr + lead:x}", flush=True)
    tick = 0
    while True:
        while phase[0] < phase[1]:
            phase[0] += 1
            m.madvise(mmap.MADV_DONTNEED, 0, PAGE)
            _ = view[0]  # the zero page again
            m[PAGE : 2 * PAGE] = pattern(1, phase[0])
            print(f"phase={phase[0]} done", flush=True)
        tick += 1
        print(f"tick={tick} phase={phase[0]} sha={hashlib.sha256(m).hexdigest()[:16]} "
              f"rss={region_rss_kib(addr)}", flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
