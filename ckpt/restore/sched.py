"""A thread's scheduling (ckpt.collect.sched), set from ckpt on each restored thread last
of all, once the stub's tasks have their own CPU mask back (Stub.release_cpu), just
before they are let go: policy first (the nice value belongs to the normal policies),
then nice, CPU affinity and I/O priority, each only where it differs."""

from __future__ import annotations

import os

from ckpt.collect.sched import read_sched
from ckpt.errors import CkptError, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.sched import IOPRIO_WHO_PROCESS
from ckpt.kernel.sys import NR, syscall


def restore_sched(tids: list[int], entry: pb.ProcessEntry) -> None:
    """``tids``: the restored threads' ids, in image order."""
    for tid, th in zip(tids, entry.threads, strict=True):
        if not th.HasField("sched"):
            continue
        want = th.sched
        try:
            have = read_sched(tid)
            if (have.policy, have.priority) != (want.policy, want.priority):
                os.sched_setscheduler(tid, want.policy, os.sched_param(want.priority))
            if have.nice != want.nice:
                os.setpriority(os.PRIO_PROCESS, tid, want.nice)
            if have.cpus != tuple(want.cpus):
                os.sched_setaffinity(tid, want.cpus)
            if have.ioprio != want.ioprio:
                syscall(NR.ioprio_set, IOPRIO_WHO_PROCESS, tid, want.ioprio, what="ioprio_set")
        except (OSError, CkptError) as exc:
            raise RestoreError(f"cannot restore the scheduling of thread {tid} (policy "
                               f"{want.policy}, priority {want.priority}, nice {want.nice}, "
                               f"CPUs {list(want.cpus)}, ioprio {want.ioprio}): {exc}") from None
