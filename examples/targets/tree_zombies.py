"""A parent with two zombie children: one dead by exit(CODE), one killed by SIGTERM. The
parent does not reap them until told to. With --setuid UID the exiting child first
takes UID as every user and group id and its only supplementary group (run as root);
with --cgroup DIR the parent first moves itself into cgroup directory DIR.

Prints ``ready EXITED KILLED`` (the children's pids) once both are zombies, then
``tick=N`` every 0.05 s; when the file CONTROL appears it reaps each child with
waitpid(pid) and prints ``reaped PID exited=S`` / ``reaped PID signaled=S``, then
goes on ticking.

usage: tree_zombies.py CONTROL [--code CODE (7)] [--setuid UID] [--cgroup DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import time


def status_text(status: int) -> str:
    if os.WIFEXITED(status):
        return f"exited={os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        return f"signaled={os.WTERMSIG(status)}"
    return f"status={status}"


def is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rfind(")") + 2] == "Z"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("control")
    ap.add_argument("--code", type=int, default=7)
    ap.add_argument("--setuid", type=int)
    ap.add_argument("--cgroup")
    args = ap.parse_args()
    control = args.control
    if args.cgroup:
        with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as f:
            f.write("0")
    exited = os.fork()
    if exited == 0:
        if args.setuid is not None:
            os.setgroups([args.setuid])
            os.setresgid(args.setuid, args.setuid, args.setuid)
            os.setresuid(args.setuid, args.setuid, args.setuid)
        os._exit(args.code)
    killed = os.fork()
    if killed == 0:
        while True:
            signal.pause()
    os.kill(killed, signal.SIGTERM)
    while not (is_zombie(exited) and is_zombie(killed)):
        time.sleep(0.01)
    print(f"ready {exited} {killed}", flush=True)
    n = 0
    while True:
        n += 1
        if control and os.path.exists(control):
            control = ""
            for pid in (exited, killed):
                got, status = os.waitpid(pid, 0)
                print(f"reaped {got} {status_text(status)}", flush=True)
        print(f"tick={n}", flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
