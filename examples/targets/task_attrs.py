"""Threads with their own scheduler attributes: name, CPU affinity, nice, policy, I/O
priority. Each check reports every thread's attributes by name, as the kernel shows them.

    main     (the process's name: task_attrs.py)  untouched
    w-idle   SCHED_IDLE, CPU 0 only
    w-batch  SCHED_BATCH, nice 7, I/O priority best-effort level 6
    w-fifo   SCHED_FIFO priority 3 (needs root), last CPU only, reset-on-fork
"""

from __future__ import annotations

import ctypes
import os
import threading

from fdkit import serve

libc = ctypes.CDLL(None, use_errno=True)
NR_IOPRIO_GET, NR_IOPRIO_SET, WHO_PROCESS = 252, 251, 1
CPUS = sorted(os.sched_getaffinity(0))


def worker(name: str, ready: threading.Barrier) -> None:
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write(name)
    if name == "w-idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        os.sched_setaffinity(0, {CPUS[0]})
    elif name == "w-batch":
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, 7)
        assert libc.syscall(NR_IOPRIO_SET, WHO_PROCESS, 0, (2 << 13) | 6) == 0
    elif name == "w-fifo":
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(3))
        os.sched_setaffinity(0, {CPUS[-1]})
    ready.wait()
    threading.Event().wait()


def setup(args: list[str]) -> None:
    ready = threading.Barrier(4)
    for name in ("w-idle", "w-batch", "w-fifo"):
        threading.Thread(target=worker, args=(name, ready), daemon=True).start()
    ready.wait()


def check(state: None) -> dict[str, object]:
    out: dict[str, object] = {}
    for tid in sorted(int(t) for t in os.listdir("/proc/self/task")):
        with open(f"/proc/self/task/{tid}/comm") as f:
            name = f.read().strip()
        out[name] = [os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority,
                     os.getpriority(os.PRIO_PROCESS, tid), sorted(os.sched_getaffinity(tid)),
                     libc.syscall(NR_IOPRIO_GET, WHO_PROCESS, tid)]
    return out


if __name__ == "__main__":
    serve(setup, check)
