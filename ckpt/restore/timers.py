"""POSIX timers: created under their dumped ids once the threads exist (a SIGEV_THREAD_ID
timer names one), armed among the last syscalls, so the time left runs from the release.

    create   PR_TIMER_CREATE_RESTORE_IDS on: timer_create reads the id to take from its
             timer_t argument; off again after. Without it (kernels before 6.15) ids come
             from a counter starting at 0 in the fresh stub: every id up to the highest is
             created and the ones not dumped deleted (linear_plan).
    arm      timer_settime(time left, interval), relative: the restored timer fires as
             long after the release as the dumped one had left at the freeze.

A timer whose signal was pending at the dump is restored with it pending (the siginfo is
queued as dumped, ckpt.restore.tasks). timer_getoverrun reads the count of the last
delivered signal; the kernel offers no way to set it (timer_settime resets it to 0), so
the dump refuses a timer with overruns (ckpt.collect.timers.overrun_refusal).
"""

from __future__ import annotations

import errno
import struct

from ckpt.collect.timers import map_clock
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.ptrace import Injector
from ckpt.kernel.sys import NR, vm_read
from ckpt.kernel.timers import (
    PR_TIMER_CREATE_RESTORE_IDS,
    RESTORE_IDS_OFF,
    RESTORE_IDS_ON,
    SIGEV_THREAD_ID,
    itimerspec,
    sigevent,
)
from ckpt.restore.stub import Stub

SIGEVENT_AT, TIMER_ID_AT, SPEC_AT = 4096, 4160, 4176  # scratch offsets


def linear_plan(ids: list[int]) -> list[tuple[int, bool]]:
    """Without kernel help: (id, keep) for every id from 0 to the highest dumped, in the
    order a fresh process's counter hands them out; the ones not kept are deleted."""
    wanted = set(ids)
    return [(i, i in wanted) for i in range(max(ids, default=-1) + 1)]


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
    exact = stub.sc(NR.prctl, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON, 0, 0, 0,
                    check=False) == 0
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


def arm_timers(inj: Injector, stub: Stub, entry: pb.ProcessEntry) -> None:
    """timer_settime for every armed timer, through a last-syscalls injector."""
    for t in entry.posix_timers:
        if t.value_ns:
            inj(NR.timer_settime, t.id, 0, stub.put(itimerspec(t.interval_ns, t.value_ns),
                                                    SPEC_AT), 0,
                what=f"timer_settime({t.id})")
