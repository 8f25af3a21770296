"""Target holding an fd ckpt cannot checkpoint (a netlink socket), otherwise idle.

Prints "ready fd=<socket fd>" once, then sleeps in one long time.sleep(), so any
ptrace interrupt (a freeze) shows up as extra context switches in /proc/PID/status.
"""

from __future__ import annotations

import socket
import sys
import time


def main() -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
    sock.bind((0, 0))
    sys.stdout.write(f"ready fd={sock.fileno()}\n")
    sys.stdout.flush()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
