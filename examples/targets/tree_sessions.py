"""A tree spanning two sessions and three process groups:

    root             (its own session and group, as the harness starts it)
    ├── peer         same session and group as root
    └── leader       setsid(): a session and group of its own
        └── grandchild   setpgid(0, 0): its own group inside leader's session

With ``orphans``, groups and a session whose leader is gone (restore needs helpers):

    root             a child subreaper, its own session and group
    ├── grouped      in the group of a process (L) that made it and exited
    └── sessioned    in the session and group of a process (S) that made it and exited

(L did setpgid(0, 0), S setsid(); each forked its child and exited, the root reaped it
and the child was reparented to the root). The root prints ``ready L S``.

Every member writes ``ROLE N`` every 0.05 s to stdout (the one open file they all
inherited: one shared offset), after the root printed ``ready``.

usage: tree_sessions.py [orphans]
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


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


def orphan(role: str, setup: str) -> int:
    """Fork a process that runs ``setup``, forks ``role`` (ticking in its group and
    session) and exits; reap it and return its pid."""
    gone = os.fork()
    if gone == 0:
        if setup == "setsid":
            os.setsid()
        else:
            os.setpgid(0, 0)
        spawn(role, "")
        os._exit(0)
    os.waitpid(gone, 0)
    return gone


def main() -> None:
    if sys.argv[1:] == ["orphans"]:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        gone = [orphan("grouped", "setpgid"), orphan("sessioned", "setsid")]
        print(f"ready {gone[0]} {gone[1]}", flush=True)
    else:
        spawn("peer", "")
        spawn("leader", "setsid")
        print("ready", flush=True)
    tick("root")


if __name__ == "__main__":
    main()
