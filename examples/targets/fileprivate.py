"""A private file mapping whose COW'd pages are dropped again with MADV_DONTNEED.

After the drop a page reads the file's bytes again; a checkpoint that kept "same as
parent" for it would bring back the dropped copy. Protocol: prints `ready`; SIGUSR1 drops
pages 0-1 and writes page 2 (`phase=1 done`); SIGUSR2 checks every page (`verify ok` or
`verify FAIL page=N`).
usage: fileprivate.py DIR
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
import time

PAGE = 4096
PAGES = 16


def file_page(i: int) -> bytes:
    return bytes([65 + i]) * PAGE


def main() -> None:
    path = os.path.join(sys.argv[1], "backing.bin")
    with open(path, "wb") as f:
        f.write(b"".join(file_page(i) for i in range(PAGES)))
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, PAGES * PAGE, flags=mmap.MAP_PRIVATE,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    want = {i: file_page(i) for i in range(PAGES)}
    for i in range(4):
        want[i] = b"x" * PAGE
        m[i * PAGE : (i + 1) * PAGE] = want[i]
    events: list[int] = []
    signal.signal(signal.SIGUSR1, lambda s, f: events.append(s))
    signal.signal(signal.SIGUSR2, lambda s, f: events.append(s))
    print("ready", flush=True)
    while True:
        while not events:
            time.sleep(0.01)
        sig = events.pop(0)
        if sig == signal.SIGUSR1:
            m.madvise(mmap.MADV_DONTNEED, 0, 2 * PAGE)
            want[0], want[1] = file_page(0), file_page(1)
            want[2] = b"y" * PAGE
            m[2 * PAGE : 3 * PAGE] = want[2]
            print("phase=1 done", flush=True)
        else:
            bad = [i for i in range(PAGES) if m[i * PAGE : (i + 1) * PAGE] != want[i]]
            print("verify ok" if not bad else f"verify FAIL page={bad[0]}", flush=True)


if __name__ == "__main__":
    main()
