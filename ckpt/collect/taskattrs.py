"""Per-thread attributes the scheduler and /proc hold, read and set from outside the
thread (no injection): one table row each, its reader and its writer side by side.

    row     read (dump, frozen)                 write (restore, before the release)
    comm    /proc/PID/task/TID/comm             prctl(PR_SET_NAME) injected into the
                                                thread (only its own group may write it)
    cpus    sched_getaffinity(tid)              sched_setaffinity(tid)
    sched   sched_getscheduler + sched_getparam sched_setscheduler (policy with
                                                SCHED_RESET_ON_FORK, RT priority)
    nice    getpriority(PRIO_PROCESS, tid)      setpriority
    ioprio  ioprio_get(IOPRIO_WHO_PROCESS, tid) ioprio_set

Refused before the freeze (:func:`refusals`): SCHED_DEADLINE threads (their runtime,
deadline and period need sched_getattr, not read here).

Written by root on a restored thread, these give it exactly what it had: a nice value or
RT priority the process could not set itself is only what it held at the dump.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ckpt.collect.fdkinds.base import Remote
from ckpt.collect.proc import proc_errors
from ckpt.errors import NoSuchProcess, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.sys import NR, ioprio_get, ioprio_set

SCHED_DEADLINE = 6
PR_SET_NAME, TASK_COMM_LEN = 15, 16
RESET_ON_FORK = os.SCHED_RESET_ON_FORK


@dataclass(frozen=True)
class Row:
    """``read(pid, tid, out)`` fills its fields of TaskAttrs; ``write(pid, tid, attrs)``
    sets them on a restored thread."""

    name: str
    read: Callable[[int, int, pb.TaskAttrs], None]
    write: Callable[[int, int, pb.TaskAttrs], None]


def _read_comm(pid: int, tid: int, out: pb.TaskAttrs) -> None:
    with proc_errors(pid, "comm"), open(f"/proc/{pid}/task/{tid}/comm", "rb") as f:
        out.comm = f.read().rstrip(b"\n").decode("utf-8", "surrogateescape")


def _write_comm(pid: int, tid: int, a: pb.TaskAttrs) -> None:
    """Done by :func:`name_thread` from inside the thread."""


def name_thread(remote: Remote, attrs: pb.TaskAttrs) -> None:
    """prctl(PR_SET_NAME) in the restored thread ``remote`` drives."""
    if attrs.comm:
        name = attrs.comm.encode("utf-8", "surrogateescape")[:TASK_COMM_LEN - 1]
        remote.sc(NR.prctl, PR_SET_NAME, remote.put(name + b"\0"), 0, 0, 0,
                  what="PR_SET_NAME")


def _read_cpus(pid: int, tid: int, out: pb.TaskAttrs) -> None:
    out.cpus.extend(sorted(os.sched_getaffinity(tid)))


def _write_cpus(pid: int, tid: int, a: pb.TaskAttrs) -> None:
    os.sched_setaffinity(tid, list(a.cpus))


def _read_sched(pid: int, tid: int, out: pb.TaskAttrs) -> None:
    out.policy = os.sched_getscheduler(tid)
    out.rt_priority = os.sched_getparam(tid).sched_priority


def _write_sched(pid: int, tid: int, a: pb.TaskAttrs) -> None:
    os.sched_setscheduler(tid, a.policy, os.sched_param(a.rt_priority))


def _read_nice(pid: int, tid: int, out: pb.TaskAttrs) -> None:
    out.nice = os.getpriority(os.PRIO_PROCESS, tid)


def _write_nice(pid: int, tid: int, a: pb.TaskAttrs) -> None:
    os.setpriority(os.PRIO_PROCESS, tid, a.nice)


def _read_ioprio(pid: int, tid: int, out: pb.TaskAttrs) -> None:
    out.ioprio = ioprio_get(tid)


def _write_ioprio(pid: int, tid: int, a: pb.TaskAttrs) -> None:
    ioprio_set(tid, a.ioprio)


ROWS: tuple[Row, ...] = (
    Row("comm", _read_comm, _write_comm),
    Row("sched", _read_sched, _write_sched),  # before nice: a policy change resets it
    Row("nice", _read_nice, _write_nice),
    Row("cpus", _read_cpus, _write_cpus),
    Row("ioprio", _read_ioprio, _write_ioprio),
)


def collect_task_attrs(pid: int, tids: Sequence[int]) -> list[pb.TaskAttrs]:
    """Every row of every thread (call it while the process is frozen)."""
    out = []
    for tid in tids:
        attrs = pb.TaskAttrs()
        for row in ROWS:
            try:
                row.read(pid, tid, attrs)
            except ProcessLookupError:
                raise NoSuchProcess(pid, f"thread {tid}") from None
        out.append(attrs)
    return out


def read_policies(tids: Sequence[int]) -> list[tuple[int, int]]:
    """(tid, scheduling policy) of each thread still there."""
    out = []
    for tid in tids:
        try:
            out.append((tid, os.sched_getscheduler(tid)))
        except ProcessLookupError:
            continue
    return out


def refusals(pid: int, policies: Sequence[tuple[int, int]]) -> list[str]:
    """Threads whose attributes a restore could not set again (pure)."""
    return [f"thread {tid} of process {pid} runs under SCHED_DEADLINE: not supported yet"
            for tid, policy in policies if policy & ~RESET_ON_FORK == SCHED_DEADLINE]


def restore_task_attrs(pid: int, tids: Sequence[int], threads: Sequence[Any]) -> None:
    """Set every row on the restored threads (``threads``: ThreadCore, same order as
    ``tids``); images without attributes (older ckpt) are left as they are."""
    for tid, th in zip(tids, threads, strict=True):
        if not th.HasField("attrs"):
            continue
        for row in ROWS:
            try:
                row.write(pid, tid, th.attrs)
            except OSError as exc:
                raise RestoreError(f"cannot restore the {row.name} of thread {tid}: "
                                   f"{exc.strerror or exc}") from None
