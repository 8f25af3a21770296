"""A tree spanning two sessions and three process groups:

    root             (its own session and group, as the harness starts it)
    ├── peer         same session and group as root
    └── leader       setsid(): a session and group of its own
        └── grandchild   setpgid(0, 0): its own group inside leader's session

Every member writes ``ROLE N`` every 0.05 s to stdout (the one open file they all
inherited: one shared offset), after the root printed ``ready``.

usage: tree_sessions.py
"""

from __future__ import annotations

import os
import time


def tick(role: str) -> None:
    n = 0
    while True:
        n += 1
        os.write(1, f"{role} {n}\n".encode())
        time.sleep(0.05)


def spawn(role: str, setup: str, inherited: tuple[int, ...] = ()) -> int:
    """Fork a child that closes ``inherited``, runs ``setup`` ('setsid', 'setpgid' or
    ''), forks its own child if it is the leader, and ticks; return the child's pid once
    all that is done (it says so on a pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for fd in (r, *inherited):
            os.close(fd)
        if setup == "setsid":
            os.setsid()
        elif setup == "setpgid":
            os.setpgid(0, 0)
        if role == "leader":
            spawn("grandchild", "setpgid", (w,))
        os.write(w, b"x")
        os.close(w)
        tick(role)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    return pid


def main() -> None:
    spawn("peer", "")
    spawn("leader", "setsid")
    print("ready", flush=True)
    tick("root")


if __name__ == "__main__":
    main()
