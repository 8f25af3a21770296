"""A process that opens a file and enters a directory as root, then gives root up (as a
daemon does): it holds what its uid could not open. Usage: dropped.py FILE DIR.

Prints ``N uid=U data='...'`` every 50 ms, reading FILE again through its fd."""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    fd = os.open(sys.argv[1], os.O_RDONLY)  # fd 3: the harness closes every fd above 2
    os.chdir(sys.argv[2])
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    n = 0
    while True:
        n += 1
        data = os.pread(fd, 100, 0).decode().strip()
        print(f"{n} uid={os.getuid()} data={data!r}", flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
