"""A thread's scheduling, read from ckpt (no injection: root may ask about any thread):
policy and real-time priority (sched_getscheduler, sched_getparam), nice
(getpriority), CPU affinity (sched_getaffinity) and I/O priority (ioprio_get). A restore
sets them again from ckpt once the stub's tasks leave ckpt's CPU (ckpt.restore.sched).

SCHED_DEADLINE is refused: its runtime, deadline and period (sched_getattr) are not
kept, and admission control may refuse them elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckpt.errors import NoSuchProcess, NotDumpable
from ckpt.kernel.sched import IOPRIO_WHO_PROCESS, SCHED_DEADLINE, SCHED_RESET_ON_FORK
from ckpt.kernel.sys import NR, syscall


@dataclass(frozen=True)
class Sched:
    policy: int  # with SCHED_RESET_ON_FORK
    priority: int
    nice: int
    cpus: tuple[int, ...]
    ioprio: int


def read_sched(tid: int) -> Sched:
    try:
        policy = os.sched_getscheduler(tid)
        sched = Sched(policy=policy, priority=os.sched_getparam(tid).sched_priority,
                      nice=os.getpriority(os.PRIO_PROCESS, tid),
                      cpus=tuple(sorted(os.sched_getaffinity(tid))),
                      ioprio=syscall(NR.ioprio_get, IOPRIO_WHO_PROCESS, tid, what="ioprio_get",
                                     pid=tid))
    except ProcessLookupError:
        raise NoSuchProcess(tid, "sched_getscheduler") from None
    if policy & ~SCHED_RESET_ON_FORK == SCHED_DEADLINE:
        raise NotDumpable(f"thread {tid} runs under SCHED_DEADLINE, whose runtime, deadline "
                          "and period a restore does not set again: not supported")
    return sched


def read_policies(tids: list[int]) -> list[tuple[int, int]]:
    """(tid, scheduling policy) of each thread still there: what :func:`refusals` judges
    before the freeze (read_sched judges again while frozen)."""
    out = []
    for tid in tids:
        try:
            out.append((tid, os.sched_getscheduler(tid)))
        except ProcessLookupError:
            continue
    return out


def refusals(pid: int, policies: list[tuple[int, int]] | tuple[tuple[int, int], ...],
             ) -> list[str]:
    """Threads whose scheduling a restore could not set again (pure)."""
    return [f"thread {tid} of process {pid} runs under SCHED_DEADLINE: not supported yet"
            for tid, policy in policies if policy & ~SCHED_RESET_ON_FORK == SCHED_DEADLINE]
