"""The pure tables behind POSIX timers, prctl settings and scheduling: /proc/PID/timers,
clocks, id plans, which pending signals a timer queues itself (ckpt.collect.timers,
ckpt.restore.timers), the prctl table (ckpt.kernel.prctl) and the image checks of their
fields (ckpt.images.validate). No root, no process."""

from __future__ import annotations

import os
import re
import struct

import pytest

from ckpt.collect.timers import (
    PosixTimer,
    ProcTimer,
    map_clock,
    overrun_refusal,
    parse_timers,
    timer_refusal,
)
from ckpt.errors import ImageError, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.validate import validate
from ckpt.kernel import prctl
from ckpt.kernel.sys import NR
from ckpt.kernel.timers import SIGEV_NONE, SIGEV_SIGNAL, SIGEV_THREAD_ID, cpu_clock
from ckpt.restore.settings import check_root_settings
from ckpt.restore.timers import image_signals, linear_plan, pending_own

PROC_TIMERS = ("ID: 5\nsignal: 0/0000000000005555\nnotify: none/pid.18832\nClockID: -6\n"
               "ID: 2\nsignal: 36/0000000000002222\nnotify: signal/tid.18874\nClockID: 7\n"
               "ID: 0\nsignal: 10/00000000deadbeef\nnotify: thread/pid.18832\nClockID: 1\n")


def test_parse_timers() -> None:
    assert parse_timers(PROC_TIMERS) == [
        ProcTimer(0, 10, 0xDEADBEEF, 2, 18832, 1),
        ProcTimer(2, 36, 0x2222, SIGEV_SIGNAL | SIGEV_THREAD_ID, 18874, 7),
        ProcTimer(5, 0, 0x5555, SIGEV_NONE, 18832, -6)]
    assert parse_timers("") == []
    with pytest.raises(ValueError):
        parse_timers("ID: 1\nsignal: 1/0\nnotify: bogus/pid.1\nClockID: 1\n")


def test_timer_clocks() -> None:
    """CPU clocks: the caller's own process clock is kept, a thread clock only where the
    thread is known, a clock of a thread of the process is mapped, another's refused."""
    t = ProcTimer(0, 14, 0, SIGEV_SIGNAL, 10, 1)
    assert timer_refusal(t, (10, 11)) is None
    assert timer_refusal(ProcTimer(0, 14, 0, 0, 10, -6), (10, 11)) is None
    assert timer_refusal(ProcTimer(0, 14, 0, 0, 10, -2), (10,)) is None
    assert "thread that created it" in (timer_refusal(ProcTimer(0, 14, 0, 0, 10, -2),
                                                      (10, 11)) or "")
    assert timer_refusal(ProcTimer(0, 14, 0, 0, 10, cpu_clock(11, 6)), (10, 11)) is None
    assert "process 12" in (timer_refusal(ProcTimer(0, 14, 0, 0, 10, cpu_clock(12, 2)),
                                          (10, 11)) or "")
    assert "not one a timer uses" in (timer_refusal(ProcTimer(0, 14, 0, 0, 10, 5), (10,)) or "")
    assert map_clock(cpu_clock(11, 6), {10: 20, 11: 21}) == cpu_clock(21, 6)
    assert map_clock(-6, {10: 20}) == -6
    assert map_clock(7, {10: 20}) == 7


def test_linear_plan() -> None:
    assert linear_plan([0, 2, 3]) == [(0, True), (1, False), (2, True), (3, True)]
    assert linear_plan([]) == []


def fake_prctl(values: dict[int, int], memory: dict[int, bytes]) -> prctl.Raw:
    """prctl and arch_prctl over a table {option: value}; EINVAL (-22) for options it
    lacks."""
    def call(nr: int, option: int, *args: int) -> int:
        assert nr in (NR.prctl, NR.arch_prctl)
        if option not in values:
            return -22
        s = next(s for s in prctl.SETTINGS if s.get[0] == option)
        if s.read in (prctl.Read.INT_AT_ARG2, prctl.Read.ARCH_U64_AT_ARG2):
            memory[args[0]] = struct.pack("i" if nr == NR.prctl else "Q", values[option])
            return 0
        if s.read == prctl.Read.U64_AT_ARG5:
            memory[args[3]] = struct.pack("Q", values[option])
            return 0
        return values[option]
    return call


def test_read_settings_by_table() -> None:
    memory: dict[int, bytes] = {}
    call = fake_prctl({prctl.PR_GET_PDEATHSIG: 0, prctl.PR_GET_TIMERSLACK: 77,
                       prctl.PR_SCHED_CORE: 0, prctl.PR_GET_SPECULATION_CTRL: 3},
                      memory)
    inside = prctl.Task(os.getpid(), call, lambda at, n: memory[at][:n], 0x1000,
                        lambda: 0, lambda: 0)
    outside = prctl.Task(os.getpid(), None, None, 0,
                         lambda: prctl.PF_MEMALLOC_NOIO | prctl.PF_LOCAL_THROTTLE, lambda: 0)
    got = {**prctl.read_settings(prctl.Scope.THREAD, inside),
           **prctl.read_settings(prctl.Scope.THREAD, outside)}
    assert got == {"pdeath_signal": 0, "timer_slack": 77, "io_flusher": 1, "sched_core": 0,
                   "syscall_user_dispatch": 0,
                   "spec_store_bypass": 3, "spec_indirect_branch": 3, "spec_l1d_flush": 3}
    assert prctl.refused(got) == []
    assert prctl.refused({**got, "sched_core": 5}) == ["sched_core = 0x5"]
    # kept for a tree's member; the root's parent is not restored (it would be ckpt)
    assert prctl.refused({**got, "pdeath_signal": 9}) == []
    assert prctl.root_refused({**got, "pdeath_signal": 9}) == ["pdeath_signal = 0x9"]
    shstk = prctl.read_settings(prctl.Scope.THREAD, prctl.Task(
        os.getpid(), fake_prctl({prctl.ARCH_SHSTK_STATUS: 1}, memory),
        lambda at, n: memory[at][:n], 0x2000, lambda: 0, lambda: 0))
    assert shstk == {"shadow_stack": 1}
    assert prctl.refused(shstk) == ["shadow_stack = 0x1"]
    sud = prctl.read_settings(prctl.Scope.THREAD, prctl.Task(os.getpid(), None, None, 0,
                                                             lambda: 0, lambda: 1))
    assert sud == {"io_flusher": 0, "syscall_user_dispatch": 1}
    assert prctl.refused(sud) == ["syscall_user_dispatch = 0x1"]


def test_settings_table_is_whole() -> None:
    """Every row says its scope and how to set it (or is refused); names are unique."""
    assert len(prctl.BY_NAME) == len(prctl.SETTINGS)
    for s in prctl.SETTINGS:
        assert s.scope in (prctl.Scope.PROCESS, prctl.Scope.THREAD)
    assert prctl.BY_NAME["pdeath_signal"].set is not None
    assert set(prctl.ROOT_REFUSED) <= set(prctl.BY_NAME)
    assert {s.name for s in prctl.in_scope(prctl.Scope.PROCESS)} == {
        "child_subreaper", "thp_disable", "mdwe", "memory_merge"}


def test_to_set() -> None:
    thp, spec = prctl.BY_NAME["thp_disable"], prctl.BY_NAME["spec_store_bypass"]
    assert prctl.to_set(thp, 3, 0) == (prctl.PR_SET_THP_DISABLE, 1, 2, 0, 0)
    assert prctl.to_set(thp, 0, 1) == (prctl.PR_SET_THP_DISABLE, 0, 0, 0, 0)
    assert prctl.to_set(thp, 1, 1) is None
    assert prctl.to_set(thp, 0, None) is None  # the kernel lacks it: default is fine
    assert prctl.to_set(thp, 1, None) == (prctl.PR_SET_THP_DISABLE, 1, 0, 0, 0)
    assert prctl.to_set(spec, 2, 4) is None  # not per task (no PR_SPEC_PRCTL): the machine's
    assert prctl.to_set(spec, 1 | 4, 1 | 2) == (prctl.PR_SET_SPECULATION_CTRL, 0, 4, 0, 0)
    mce = prctl.BY_NAME["mce_kill"]
    assert prctl.to_set(mce, prctl.PR_MCE_KILL_DEFAULT, 1) == (prctl.PR_MCE_KILL, 0, 0, 0, 0)
    assert prctl.to_set(mce, 1, 2) == (prctl.PR_MCE_KILL, 1, 1, 0, 0)
    assert prctl.stat_flags("1 (a b) S 0 1 1 0 -1 4194560 0") == 4194560


def core_with(**kw: object) -> pb.ProcessEntry:
    entry = pb.ProcessEntry(pid=10, threads=[pb.ThreadCore(tid=10, creds=pb.Creds()),
                                             pb.ThreadCore(tid=11, creds=pb.Creds())])
    for name, value in kw.items():
        getattr(entry, name).extend(value)
    return entry


@pytest.mark.parametrize("entry, says", [
    (core_with(posix_timers=[pb.PosixTimer(id=1, notify=7, signo=14, clock=1)]),
     "posix_timers[0].notify = 7"),
    (core_with(posix_timers=[pb.PosixTimer(id=1, notify=0, signo=0, clock=1)]),
     "posix_timers[0].signo = 0: not a signal"),
    (core_with(posix_timers=[pb.PosixTimer(id=1, notify=4, signo=14, clock=1,
                                           notify_tid=12)]),
     "posix_timers[0].notify_tid = 12"),
    (core_with(posix_timers=[pb.PosixTimer(id=1, notify=1, clock=cpu_clock(99, 2))]),
     "the CPU clock of another process"),
    (core_with(posix_timers=[pb.PosixTimer(id=1, notify=1, clock=1),
                             pb.PosixTimer(id=1, notify=1, clock=1)]),
     "posix_timers.id[1] = 1: a duplicate"),
    (core_with(settings=[pb.Setting(name="timer_slack", value=1)]),
     "not a per-process setting"),
    (core_with(settings=[pb.Setting(name="bogus", value=1)]), "settings[0].name = 'bogus'"),
    (core_with(settings=[pb.Setting(name="mdwe", value=-1)]), "settings[0].value = -1: not in"),
    (core_with(threads=[pb.ThreadCore(tid=10, creds=pb.Creds(), sched=pb.Sched(nice=20))]),
     "threads[2].sched.nice = 20"),
    (core_with(threads=[pb.ThreadCore(tid=10, creds=pb.Creds(), sched=pb.Sched(policy=6))]),
     "threads[2].sched.policy = 6"),
])
def test_bad_timers_and_settings_are_refused(entry: pb.ProcessEntry, says: str) -> None:
    with pytest.raises(ImageError, match=re.escape(says)):
        validate("core-10.img", entry)
    good = core_with(posix_timers=[pb.PosixTimer(id=3, notify=4, signo=36, clock=-6,
                                                 notify_tid=11)],
                     settings=[pb.Setting(name="mdwe", value=1)])
    validate("core-10.img", good)
    named = core_with()
    named.threads[1].name = b"x" * 16
    with pytest.raises(ImageError, match=r"threads\[1\]\.name = .*not a thread name"):
        validate("core-10.img", named)


def test_overrun_refusal() -> None:
    """An overrun count comes back only where replaying expiries recreates it."""
    plain = ProcTimer(0, 14, 0, SIGEV_SIGNAL, 10, 1)
    ok = PosixTimer(plain, interval_ns=10, value_ns=4, overrun=3)
    assert overrun_refusal(ok) is None
    assert overrun_refusal(PosixTimer(plain, interval_ns=0, value_ns=0, overrun=0)) is None
    cpu = PosixTimer(ProcTimer(0, 14, 0, SIGEV_SIGNAL, 10, -6), 10, 4, 3)
    assert "CPU clock" in (overrun_refusal(cpu) or "")
    trap = PosixTimer(ProcTimer(0, 5, 0, SIGEV_SIGNAL, 10, 1), 10, 4, 3)
    assert "SIGTRAP" in (overrun_refusal(trap) or "")
    assert "off its interval" in (overrun_refusal(PosixTimer(plain, 10, 40, 3)) or "")


def timer_siginfo(signo: int, timer_id: int) -> bytes:
    return struct.pack("<iiiiii", signo, 0, -2, 0, timer_id, 0).ljust(128, b"\0")


def test_image_signals_leave_out_what_timers_queue_themselves() -> None:
    """A periodic timer's own pending signal is queued by the timer (armed in the past),
    not from the image; a one-shot's, another timer's, or a CPU clock's stays in the
    image's queue, each only once."""
    entry = core_with(posix_timers=[
        pb.PosixTimer(id=1, clock=1, notify=0, signo=37, interval_ns=10, value_ns=5),
        pb.PosixTimer(id=2, clock=1, notify=0, signo=38, value_ns=5),  # one-shot
        pb.PosixTimer(id=3, clock=-6, notify=0, signo=39, interval_ns=10, value_ns=5),
        pb.PosixTimer(id=4, clock=1, notify=4, signo=40, interval_ns=10, value_ns=5,
                      notify_tid=11)])
    mine, other = timer_siginfo(37, 1), timer_siginfo(37, 9)
    entry.shared_pending.extend([other, mine, timer_siginfo(38, 2), timer_siginfo(39, 3),
                                 mine])
    entry.threads[1].pending_signals.append(timer_siginfo(40, 4))
    assert pending_own(entry) == {1: (0, mine), 4: (11, timer_siginfo(40, 4))}
    assert image_signals(entry, 0, entry.shared_pending) == [
        other, timer_siginfo(38, 2), timer_siginfo(39, 3), mine]
    assert image_signals(entry, 11, entry.threads[1].pending_signals) == []
    assert image_signals(entry, 10, [timer_siginfo(40, 4)]) == [timer_siginfo(40, 4)]


def test_a_crafted_root_with_a_parent_death_signal_is_refused() -> None:
    entry = pb.ProcessEntry(pid=5)
    entry.threads.add(tid=5).settings.add(name="timer_slack", value=1)
    check_root_settings(entry)
    entry.threads.add(tid=6).settings.add(name="pdeath_signal", value=9)
    with pytest.raises(RestoreError, match="thread 6 of the restored process has "
                                           "pdeath_signal = 0x9"):
        check_root_settings(entry)
