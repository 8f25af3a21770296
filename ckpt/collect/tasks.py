"""State only the kernel or the task itself can tell: registers via ptrace, and a few values
read by injecting syscalls into the frozen task (sigactions, brk, tid address, altstack,
whether mlockall(MCL_FUTURE) is in effect).

Injection is kill-safe where the target allows it (ckpt.collect.inject): outputs land in
scratch bytes below each thread's own stack frame. Otherwise a scratch page is mapped in
the target for the duration and unmapped before memory is scanned, so the dumped address
space is the target's own.
"""

from __future__ import annotations

import signal
import struct
import time
from dataclasses import dataclass, field

from ckpt.collect import mlockall
from ckpt.collect.creds import Creds, collect_creds
from ckpt.collect.inject import open_injector
from ckpt.collect.proc import read_text
from ckpt.collect.pstate import MEMBARRIER_CMD_GET_REGISTRATIONS
from ckpt.collect.sched import Sched, read_sched
from ckpt.collect.timers import PosixTimer, overrun_refusal, read_timers
from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.errors import NotDumpable
from ckpt.kernel import prctl
from ckpt.kernel.creds import PR_GET_DUMPABLE, PR_GET_SECUREBITS
from ckpt.kernel.ptrace import (
    NT_X86_XSTATE,
    Injector,
    Regs,
    RseqConfig,
    Tracee,
)
from ckpt.kernel.sys import NR, PAGE_SIZE, vm_read
from ckpt.kernel.timers import ITIMERSPEC, parse_itimerspec

PR_GET_TID_ADDRESS = 40
PROT_RW = 3
MAP_PRIVATE_ANON = 0x22
MAP_FIXED_NOREPLACE = 0x100000
LOWEST_SCRATCH = 0x10000000  # far above mmap_min_addr and the usual executable
USER_END = 1 << 47  # [vsyscall] lies above: not a neighbour to map below


def isolated_page(vmas: list[VmaInfo]) -> int:
    """An address for a scratch page with a free page on either side, so that it can not
    merge with a neighbour: a merged VMA would turn VM_SOFTDIRTY as a whole and soft-dirty
    would copy it whole. Never just below a stack (its guard gap). 0 if the address space
    has no such gap (let the kernel choose)."""
    spans = sorted((v for v in vmas if v.end <= USER_END), key=lambda v: v.start)
    for below, above in zip(reversed(spans[:-1]), reversed(spans[1:]), strict=True):
        grows_down = above.kind == VmaKind.STACK or "gd" in above.vmflags
        if (above.start - below.end >= 3 * PAGE_SIZE and below.end >= LOWEST_SCRATCH
                and not grows_down):
            return above.start - 2 * PAGE_SIZE
    return 0
UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)
_KSIGACTION = struct.Struct("QQQQ")  # handler, flags, restorer, mask
_ALTSTACK = struct.Struct("QiiQ")  # ss_sp, ss_flags, pad, ss_size


ITIMER_READS = 3  # of an interval timer that reads disarmed (see collect_injected)
ITIMER_REREAD_S = 0.0002


@dataclass
class ThreadState:
    tid: int
    regs: Regs
    xstate: bytes
    sigmask: int
    rseq: RseqConfig
    robust_list: tuple[int, int]
    clear_child_tid: int = 0
    altstack: tuple[int, int, int] = (0, 2, 0)  # sp, flags (SS_DISABLE), size
    pending: list[bytes] = field(default_factory=list)  # siginfo queued to the thread
    creds: Creds | None = None  # ids, capabilities, securebits, seccomp (ckpt.collect.creds)
    settings: dict[str, int] = field(default_factory=dict)  # per thread (ckpt.kernel.prctl)
    name: bytes = b""  # PR_GET_NAME
    sched: Sched | None = None  # policy, nice, affinity, ioprio (ckpt.collect.sched)


@dataclass
class InjectedState:
    brk: int = 0
    dumpable: int = 0  # PR_GET_DUMPABLE
    sigactions: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    itimers: dict[int, tuple[int, int]] = field(default_factory=dict)  # which: (interval,
    # value) in microseconds, the armed ones
    membarrier: int = -1  # MEMBARRIER_CMD_GET_REGISTRATIONS; -1: unknown (Linux < 6.3)
    timers: list[PosixTimer] = field(default_factory=list)  # timer_create, by id
    settings: dict[str, int] = field(default_factory=dict)  # per process (ckpt.kernel.prctl)
    mlockall: int = 0  # MCL_FUTURE [| MCL_ONFAULT] in effect (ckpt.collect.mlockall)


ITIMERS = (0, 1, 2)  # ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF: per process
_ITIMERVAL = struct.Struct("qqqq")  # it_interval, it_value: (tv_sec, tv_usec) each


def signals_to_query() -> list[int]:
    """Every signal with an action: 1-64 but SIGKILL and SIGSTOP, default ones included.

    /proc's SigCgt/SigIgn tell which actions are not SIG_DFL, but not the flags, mask and
    restorer a SIG_DFL action may carry (glibc sets SA_RESTORER and its restorer whenever
    it installs one; sigaction() reads them back), so each is asked: one injected syscall
    each, about 2.5 ms of freeze for the 62 on this machine."""
    return [s for s in range(1, 65) if s not in UNCATCHABLE]


def collect_thread(task: Tracee) -> ThreadState:
    """What ptrace and /proc tell, before anything is injected (the settings read from
    outside: one that refuses the dump does so here)."""
    return ThreadState(tid=task.tid, regs=task.getregs(), xstate=task.get_regset(NT_X86_XSTATE),
                       sigmask=task.get_sigmask(), rseq=task.rseq(),
                       robust_list=task.robust_list(), pending=task.pending_signals(False),
                       sched=read_sched(task.tid),
                       settings=collect_settings(task_access(task.tid, task.tid),
                                                 prctl.Scope.THREAD))


def collect_injected(pid: int, threads: list[Tracee], states: list[ThreadState],
                     vmas: list[VmaInfo]) -> InjectedState:
    """Inject the read-only syscalls; every task's registers are put back, even on error."""
    leader = threads[0]
    inj = open_injector(pid, leader, states[0].regs, vmas, states[0].xstate, states[0].sigmask)
    out = InjectedState()
    mapped = 0

    def scratch_of(ti: Injector) -> int:
        """The injector's scratch on its thread's stack, else one mapped page."""
        nonlocal mapped
        if not ti.scratch and not mapped:
            at = isolated_page(vmas)
            mapped = inj(NR.mmap, at, PAGE_SIZE, PROT_RW,
                         MAP_PRIVATE_ANON | (MAP_FIXED_NOREPLACE if at else 0), -1, 0,
                         what="mmap")
        return ti.scratch or mapped

    try:
        at = isolated_page(vmas)  # where the scratch page goes next, when there is one
        out.mlockall = mlockall.probe(
            pid, lambda: inj.raw(NR.mmap, at, PAGE_SIZE, PROT_RW, MAP_PRIVATE_ANON
                                 | (MAP_FIXED_NOREPLACE if at else 0), -1, 0),
            lambda addr: inj(NR.munmap, addr, PAGE_SIZE, what="munmap"), PAGE_SIZE)
        scratch = scratch_of(inj)
        out.brk = inj(NR.brk, 0, what="brk")
        out.dumpable = inj(NR.prctl, PR_GET_DUMPABLE, 0, 0, 0, 0, what="PR_GET_DUMPABLE")
        out.membarrier = max(-1, inj.raw(NR.membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0))
        for which in ITIMERS:
            for _ in range(ITIMER_READS):
                inj(NR.getitimer, which, scratch, what="getitimer")
                i_sec, i_usec, v_sec, v_usec = _ITIMERVAL.unpack(
                    vm_read(pid, scratch, _ITIMERVAL.size))
                # an ITIMER_REAL under 1 us from expiry reads 0 like a disarmed one (the
                # kernel's nanoseconds truncated): a periodic one reads again, later
                if v_sec or v_usec or not (i_sec or i_usec):
                    break
                time.sleep(ITIMER_REREAD_S)
            if v_sec or v_usec:
                out.itimers[which] = (i_sec * 1_000_000 + i_usec, v_sec * 1_000_000 + v_usec)
        out.timers = collect_timers(pid, inj, scratch)
        out.settings = collect_settings(task_access(pid, pid, inj, scratch),
                                        prctl.Scope.PROCESS)  # (none read from outside)
        for sig in signals_to_query():
            if inj.raw(NR.rt_sigaction, sig, 0, scratch, 8) == 0:
                act = _KSIGACTION.unpack(vm_read(pid, scratch, _KSIGACTION.size))
                out.sigactions[sig] = act
        for task, state in zip(threads, states, strict=True):
            ti = inj if task is leader else open_injector(pid, task, state.regs, vmas,
                                                          state.xstate, state.sigmask)
            scratch = scratch_of(ti)
            try:
                got = ti.raw(NR.prctl, PR_GET_TID_ADDRESS, scratch, 0, 0, 0)
                if got == 0:
                    state.clear_child_tid = struct.unpack("Q", vm_read(pid, scratch, 8))[0]
                ti(NR.sigaltstack, 0, scratch, what="sigaltstack")
                sp, flags, _, size = _ALTSTACK.unpack(vm_read(pid, scratch, _ALTSTACK.size))
                state.altstack = (sp, flags, size)
                asked = task_access(pid, task.tid, ti, scratch)
                state.settings.update(collect_settings(asked, prctl.Scope.THREAD))
                state.name = prctl.read_name(asked)
                state.creds = collect_creds(pid, task.tid, ti(
                    NR.prctl, PR_GET_SECUREBITS, 0, 0, 0, 0, what="PR_GET_SECUREBITS"))
            finally:
                if ti is not inj:
                    ti.restore()
    finally:
        try:
            if mapped > 0:
                inj(NR.munmap, mapped, PAGE_SIZE, what="munmap")
        finally:
            inj.restore()
    return out


def collect_timers(pid: int, inj: Injector, scratch: int) -> list[PosixTimer]:
    """Every POSIX timer: /proc/PID/timers, then time left, interval and overrun count
    asked of the process (timer ids are per process: any thread may ask)."""
    out = []
    for t in read_timers(pid):
        inj(NR.timer_gettime, t.id, scratch, what=f"timer_gettime({t.id})")
        interval, value = parse_itimerspec(vm_read(pid, scratch, ITIMERSPEC.size))
        overrun = inj(NR.timer_getoverrun, t.id, what=f"timer_getoverrun({t.id})")
        timer = PosixTimer(t, interval_ns=interval, value_ns=value, overrun=overrun)
        if (why := overrun_refusal(timer)) is not None:
            raise NotDumpable(f"process {pid} has POSIX timer {t.id}, and a restore cannot set "
                              f"{why} again: not supported")
        out.append(timer)
    return out


def task_access(pid: int, tid: int, inj: Injector | None = None, scratch: int = 0,
                ) -> prctl.Task:
    """Thread ``tid`` as the prctl table asks it: through the injector (None: from
    outside only)."""
    return prctl.Task(tid, inj.raw if inj else None,
                      (lambda at, n: vm_read(pid, at, n)) if inj else None, scratch,
                      lambda: prctl.stat_flags(read_text(pid, "/proc", "task", str(tid), "stat")),
                      lambda: prctl.sud_mode(tid))


def collect_settings(task: prctl.Task, scope: prctl.Scope) -> dict[str, int]:
    """The prctl settings of ``scope`` (ckpt.kernel.prctl); one a restore cannot set
    again and that is not at its default is refused."""
    values = prctl.read_settings(scope, task)
    refused = prctl.refused(values)
    if refused:
        raise NotDumpable(f"{scope.value} {task.tid} has {refused[0]}, which a restore cannot "
                          "set again: not supported")
    return values
