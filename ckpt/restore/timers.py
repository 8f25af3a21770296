"""POSIX timers: created under their dumped ids once the threads exist (a SIGEV_THREAD_ID
timer names one), armed among the last syscalls, so the time left runs from the release.

    create   PR_TIMER_CREATE_RESTORE_IDS on: timer_create reads the id to take from its
             timer_t argument; off again after. Without it (kernels before 6.15) ids come
             from a counter starting at 0 in the fresh stub: every id up to the highest is
             created and the ones not dumped deleted (linear_plan).
    arm      timer_settime(time left, interval), relative: the restored timer fires as
             long after the release as the dumped one had left at the freeze.

    replay   a timer with an overrun count (timer_getoverrun: that of its last delivered
             signal) is armed earlier, in the trap phase, so that the kernel counts the
             overruns itself: timer_settime at an absolute time N+1 intervals before the
             next expiry, in the past, makes it fire at once; its signal, blocked, is taken
             with rt_sigtimedwait, and that rearms it N+1 intervals on (hrtimer_forward),
             at the dumped next expiry, with it_overrun_last N (timer_settime would have
             reset it). Only on clocks whose expiries are whole intervals apart and for a
             time left within one interval: the dump refuses the others
             (ckpt.collect.timers.overrun_refusal).

A periodic timer whose own signal was pending at the dump (not yet delivered: the kernel
rearms it only then) is armed at an absolute time one interval before its next expiry,
in the past: it fires at once and queues its signal itself, and its image copy is not
queued (image_signals); delivered, it rearms on the dumped grid. Overruns that the
pending signal gathered before the dump are not seen (the kernel tells them only by
delivering it). Where that cannot be done (a CPU clock, an overrun count to replay) the
image's siginfo is queued and the timer armed as usual: a later expiry while that one is
still pending then queues a second signal instead of counting an overrun.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable

from ckpt import testpoint
from ckpt.collect.timers import MAX_LINEAR_TIMER_ID, map_clock
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.ptrace import Injector
from ckpt.kernel.siginfo import signo
from ckpt.kernel.sys import NR, vm_read
from ckpt.kernel.timers import (
    NSEC,
    PR_TIMER_CREATE_RESTORE_IDS,
    RESTORE_IDS_OFF,
    RESTORE_IDS_ON,
    SI_OVERRUN,
    SIGEV_NONE,
    SIGEV_THREAD_ID,
    TIMER_ABSTIME,
    TIMESPEC,
    itimerspec,
    parse_timespec,
    restore_ids_supported,
    sigevent,
    timer_of,
    timespec,
)
from ckpt.restore.stub import Stub

SIGEVENT_AT, TIMER_ID_AT, SPEC_AT, INFO_AT = 4096, 4160, 4176, 4352  # scratch offsets
WAIT_NS = 2 * NSEC  # for the replayed expiry's signal
LEADS = (0, 0, 1, 2)  # intervals added to the time left, attempt by attempt (replay_overrun)
U64 = (1 << 64) - 1
SIGTRAP = 5


def linear_plan(ids: list[int]) -> list[tuple[int, bool]]:
    """Without kernel help: (id, keep) for every id from 0 to the highest dumped, in the
    order a fresh process's counter hands them out; the ones not kept are deleted."""
    wanted = set(ids)
    return [(i, i in wanted) for i in range(max(ids, default=-1) + 1)]


def linear_problem(ids: Iterable[int], exact: bool) -> str | None:
    """Why timers under ``ids`` cannot be made on a kernel that creates a timer under a
    given id (``exact``) or not, or None: without it, ids above MAX_LINEAR_TIMER_ID (the
    limit the dump applies on its own kernel; the restore's may lack what it had)."""
    top = max(ids, default=-1)
    if exact or top <= MAX_LINEAR_TIMER_ID:
        return None
    return (f"POSIX timer ids up to {top}, and this kernel cannot create a timer under a "
            "given id (PR_TIMER_CREATE_RESTORE_IDS, Linux 6.15): the restore would create "
            f"and delete every id below (at most {MAX_LINEAR_TIMER_ID}): not supported")


def ids_exact() -> bool:
    """Does this kernel create timers under a given id (CKPT_TEST_WITHOUT can say no)?"""
    return not testpoint.without("timer-restore-ids") and restore_ids_supported()


def check_timer_ids(entry: pb.ProcessEntry) -> None:
    """Before anything is built: RestoreError if this kernel cannot make the timer ids."""
    why = linear_problem((t.id for t in entry.posix_timers), ids_exact())
    if why is not None:
        raise RestoreError(f"process {entry.pid} has {why}")


def timer_sigevent(t: pb.PosixTimer, tid_map: dict[int, int]) -> bytes:
    tid = 0
    if t.notify & SIGEV_THREAD_ID:
        if t.notify_tid not in tid_map:
            raise RestoreError(f"POSIX timer {t.id} signals thread {t.notify_tid}, which is "
                               "not in the image")
        tid = tid_map[t.notify_tid]
    return sigevent(t.value, t.signo, t.notify, tid)


def create_timers(stub: Stub, entry: pb.ProcessEntry, tid_map: dict[int, int]) -> None:
    """Every timer under its dumped id, disarmed (``tid_map``: dumped tid -> restored)."""
    timers = {t.id: t for t in entry.posix_timers}
    if not timers:
        return
    exact = not testpoint.without("timer-restore-ids") and stub.sc(
        NR.prctl, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON, 0, 0, 0, check=False) == 0
    why = linear_problem(timers, exact)
    if why is not None:  # check_timer_ids said otherwise: the kernel's answer changed
        if exact:
            stub.sc(NR.prctl, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, 0, 0, 0, check=False)
        raise RestoreError(f"process {entry.pid} has {why}")
    plan = [(i, True) for i in sorted(timers)] if exact else linear_plan(sorted(timers))
    try:
        for timer_id, keep in plan:
            t = timers.get(timer_id, pb.PosixTimer(id=timer_id, clock=1, notify=1))
            stub.put(struct.pack("i", timer_id), TIMER_ID_AT)
            got = stub.sc(NR.timer_create, map_clock(t.clock, tid_map),
                          stub.put(timer_sigevent(t, tid_map), SIGEVENT_AT),
                          stub.scratch + TIMER_ID_AT, check=False)
            if got < 0:
                raise RestoreError(f"cannot create POSIX timer {timer_id} (clock {t.clock}): "
                                   f"{errno.errorcode.get(-got, -got)}")
            made = struct.unpack("i", vm_read(stub.pid, stub.scratch + TIMER_ID_AT, 4))[0]
            if made != timer_id:
                raise RestoreError(f"POSIX timer {timer_id} was created as timer {made}")
            if not keep:
                stub.sc(NR.timer_delete, timer_id, what=f"timer_delete({timer_id})")
    finally:
        if exact:
            stub.sc(NR.prctl, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, 0, 0, 0,
                    what="PR_TIMER_CREATE_RESTORE_IDS off")


def replay_overruns(stub: Stub, threads: list[Stub], entry: pb.ProcessEntry) -> None:
    """Arm every timer with an overrun count (see the module docstring), in the thread
    its signal goes to (``threads``: the non-leader ones, in image order).

    Such a timer runs from here on: every task blocks every signal but SIGTRAP (which a
    trap must find unblocked) until its registers and mask are loaded, so that an expiry
    meanwhile stays pending, to be delivered after the release."""
    replayed = [t for t in entry.posix_timers if t.overrun]
    if not replayed:
        return
    tasks = [stub, *threads]
    for task in tasks:
        task.task.set_sigmask(U64 & ~(1 << (SIGTRAP - 1)))
    by_tid = {th.tid: task for th, task in zip(entry.threads, tasks, strict=True)}
    for t in replayed:
        replay_overrun(by_tid.get(t.notify_tid, stub), t, by_tid)
    testpoint.pause_at("timers-replayed")


def replay_overrun(task: Stub, t: pb.PosixTimer, by_tid: dict[int, Stub]) -> None:
    """One timer's replay. The kernel rearms it on the first expiry after the moment its
    signal is taken; should that moment come after the dumped next expiry (ckpt was
    held up, or the time left is shorter than the injections take), the count is off:
    then again, anchored afresh, and then an interval or two later (as if that expiry
    had fallen in the freeze)."""
    clock = map_clock(t.clock, {tid: s.task.tid for tid, s in by_tid.items()})
    overrun = got = 0
    for lead in LEADS:
        task.sc(NR.clock_gettime, clock, task.scratch + SPEC_AT, what="clock_gettime")
        now = parse_timespec(vm_read(task.pid, task.scratch + SPEC_AT, TIMESPEC.size))
        testpoint.pause_at("timer-replay")
        first = now + t.value_ns + (lead - t.overrun - 1) * t.interval_ns
        if first <= 0:
            raise RestoreError(f"cannot give POSIX timer {t.id} its {t.overrun} overruns "
                               f"back: clock {t.clock} reads only {now} ns here")
        task.sc(NR.timer_settime, t.id, TIMER_ABSTIME,
                task.put(itimerspec(t.interval_ns, first), SPEC_AT), 0,
                what=f"timer_settime({t.id})")
        got = task.sc(NR.rt_sigtimedwait, task.put(struct.pack("Q", 1 << (t.signo - 1)),
                                                   SIGEVENT_AT),
                      task.scratch + INFO_AT, task.put(timespec(WAIT_NS), TIMER_ID_AT), 8,
                      check=False)
        info = vm_read(task.pid, task.scratch + INFO_AT, SI_OVERRUN + 4)
        overrun = struct.unpack_from("i", info, SI_OVERRUN)[0]
        if got == t.signo and overrun == t.overrun:
            return
    raise RestoreError(f"POSIX timer {t.id} did not take its {t.overrun} overruns back "
                       f"(rt_sigtimedwait: {got}, overrun {overrun})")


def pending_own(entry: pb.ProcessEntry) -> dict[int, tuple[int, bytes]]:
    """Timers that will queue their own pending signal (see the module docstring): id ->
    (the queue: 0 for the process's, else the thread's tid; the image's siginfo)."""
    threads = {th.tid: th for th in entry.threads}
    out: dict[int, tuple[int, bytes]] = {}
    for t in entry.posix_timers:
        if (not t.interval_ns or not t.value_ns or t.overrun or t.clock < 0
                or t.notify & ~SIGEV_THREAD_ID == SIGEV_NONE):
            continue
        tid = t.notify_tid if t.notify & SIGEV_THREAD_ID else 0
        queue = threads[tid].pending_signals if tid else entry.shared_pending
        info = next((i for i in queue if signo(i) == t.signo and timer_of(i) == t.id), None)
        if info is not None:
            out[t.id] = (tid, info)
    return out


def image_signals(entry: pb.ProcessEntry, tid: int, infos: Iterable[bytes]) -> list[bytes]:
    """The siginfos of one queue (``tid`` 0: the process's) to queue again: all but those
    their timers queue themselves."""
    skip = [info for queue, info in pending_own(entry).values() if queue == tid]
    out = []
    for info in infos:
        if info in skip:
            skip.remove(info)
        else:
            out.append(info)
    return out


def arm_timers(inj: Injector, stub: Stub, entry: pb.ProcessEntry) -> None:
    """timer_settime for every armed timer, through a last-syscalls injector (but those
    replay_overruns armed)."""
    own = pending_own(entry)
    for t in entry.posix_timers:
        if not t.value_ns or t.overrun:
            continue
        flags, value = 0, t.value_ns
        if t.id in own:  # one interval back: in the past, so it fires at once
            inj(NR.clock_gettime, t.clock, stub.scratch + SPEC_AT, what="clock_gettime")
            now = parse_timespec(vm_read(stub.pid, stub.scratch + SPEC_AT, TIMESPEC.size))
            flags, value = TIMER_ABSTIME, max(now + t.value_ns - t.interval_ns, 1)
        inj(NR.timer_settime, t.id, flags, stub.put(itimerspec(t.interval_ns, value), SPEC_AT),
            0, what=f"timer_settime({t.id})")
