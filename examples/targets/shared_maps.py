"""Shared memory of one process: MAP_SHARED|MAP_ANONYMOUS, a /dev/shm file and a regular
file mapped MAP_SHARED, each 16 pages, each with a counter in every page.

usage: shared_maps.py CONTROL DIR     (DIR holds the regular file; /dev/shm gets its own,
                                       named after CONTROL's last component)

Each check adds one to every page's counter of each mapping (so every page is dirty
again) and reports the sums, and the first page's counter of the two files as read()
sees it (a MAP_SHARED write reaches the file).
"""

from __future__ import annotations

import mmap
import os
import struct
import sys

from fdkit import serve

PAGE = mmap.PAGESIZE
PAGES = 16


def setup(args: list[str]) -> dict[str, object]:
    name = os.path.basename(sys.argv[1])
    maps: dict[str, mmap.mmap] = {"anon": mmap.mmap(-1, PAGES * PAGE, mmap.MAP_SHARED)}
    fds = {}
    for key, path in (("shm", f"/dev/shm/{name}"), ("file", os.path.join(args[0], "f"))):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, PAGES * PAGE)
        maps[key] = mmap.mmap(fd, PAGES * PAGE, mmap.MAP_SHARED)
        fds[key] = fd
    return {"maps": maps, "fds": fds}


def check(state: dict[str, object]) -> dict[str, object]:
    maps: dict[str, mmap.mmap] = state["maps"]  # type: ignore[assignment]
    fds: dict[str, int] = state["fds"]  # type: ignore[assignment]
    out: dict[str, object] = {}
    for key, m in maps.items():
        total = 0
        for page in range(PAGES):
            n = struct.unpack_from("Q", m, page * PAGE)[0] + page + 1
            struct.pack_into("Q", m, page * PAGE, n)
            total += n
        out[key] = total
    for key, fd in fds.items():
        out[f"{key} read"] = struct.unpack("Q", os.pread(fd, 8, 0))[0]
    return out


if __name__ == "__main__":
    serve(setup, check)
