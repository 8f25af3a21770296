"""prctl settings (the table of ckpt.kernel.prctl), set in the stub: per-process ones in
the leader, per-thread ones in each thread. Each is read in the stub first and set only
where it differs, then read back; a value that did not take is a RestoreError."""

from __future__ import annotations

import errno

from ckpt.collect.proc import read_text
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel import prctl
from ckpt.kernel.sched import SCHED_RESET_ON_FORK
from ckpt.kernel.sys import NR, vm_read
from ckpt.restore.stub import Stub

SCRATCH_AT = 4224  # scratch offset for the values prctl writes
RT_POLICIES = (1, 2)  # SCHED_FIFO, SCHED_RR


def restore_settings(task: Stub, image: list[pb.Setting]) -> None:
    """Set ``image``'s settings (one scope) in ``task``."""
    tid = task.task.tid
    for item in image:
        s = prctl.BY_NAME[item.name]  # validated (ckpt.images.validate)
        have = _read(task, s)
        args = prctl.to_set(s, item.value, have)
        if args is None:
            continue
        got = task.sc(NR.prctl, *args, check=False)
        now = _read(task, s)
        if got < 0 or now != item.value:
            why = errno.errorcode.get(-got, str(-got)) if got < 0 else f"it reads {now}"
            raise RestoreError(f"cannot set {s.name} = {item.value:#x} of {s.scope.value} "
                               f"{tid}: {why}")


def _read(task: Stub, s: prctl.Setting) -> int | None:
    return prctl.read_setting(s, asked(task))


def asked(task: Stub) -> prctl.Task:
    """A stub's thread as the prctl table asks it."""
    tid = task.task.tid
    return prctl.Task(
        tid, lambda *a: task.sc(*a, check=False), lambda at, n: vm_read(task.pid, at, n),
        task.scratch + SCRATCH_AT,
        lambda: prctl.stat_flags(read_text(task.pid, "/proc", "task", str(tid), "stat")),
        lambda: prctl.sud_mode(tid))


def restore_all_settings(stub: Stub, threads: list[Stub], entry: pb.ProcessEntry) -> None:
    """The process's settings in the leader, each thread's in it (``threads``: the
    non-leader ones, in image order)."""
    restore_settings(stub, list(entry.settings))
    for task, th in zip([stub, *threads], entry.threads, strict=True):
        restore_settings(task, [s for s in th.settings if not derived(s, th)])
        if th.name:
            task.sc(NR.prctl, prctl.PR_SET_NAME, task.put(th.name + b"\0", SCRATCH_AT), 0, 0,
                    0, what=f"PR_SET_NAME of thread {task.task.tid}")


def check_root_settings(entry: pb.ProcessEntry) -> None:
    """The restored root's parent is ckpt: settings naming its parent (a dump refuses
    them, ckpt.kernel.prctl.ROOT_REFUSED) are refused in an image too."""
    for th in entry.threads:
        found = prctl.root_refused({s.name: s.value for s in th.settings})
        if found:
            raise RestoreError(f"thread {th.tid} of the restored process has {found[0]}: "
                               "its parent would be ckpt, not the one it had")


def derived(item: pb.Setting, th: pb.ThreadCore) -> bool:
    """Settings the kernel derives from another one: a real-time thread's timer slack is
    0 whatever was asked (the kernel sets it with the policy, ckpt.restore.sched, and
    ignores PR_SET_TIMERSLACK under it)."""
    rt = th.HasField("sched") and th.sched.policy & ~SCHED_RESET_ON_FORK in RT_POLICIES
    return item.name == "timer_slack" and rt
