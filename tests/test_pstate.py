"""POSIX timers and prctl settings across dump and restore (examples/targets/pstate.py),
and the pure tables behind them (ckpt.collect.timers, ckpt.kernel.prctl)."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    needs_root,
    py_target,
    read_lines,
    run_ckpt,
    thread_ids,
    wait_for_line,
)
from test_killsafe import pause_ckpt_at
from test_migrate import start_server

from ckpt.collect.sched import read_sched
from ckpt.collect.timers import (
    PosixTimer,
    ProcTimer,
    map_clock,
    overrun_refusal,
    parse_timers,
    read_timers,
    timer_refusal,
)
from ckpt.errors import ImageError
from ckpt.images import ImageDir
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.validate import validate
from ckpt.kernel import prctl
from ckpt.kernel.siginfo import signo
from ckpt.kernel.sys import NR
from ckpt.kernel.timers import SIGEV_NONE, SIGEV_SIGNAL, SIGEV_THREAD_ID, cpu_clock, timer_of
from ckpt.restore.timers import image_signals, linear_plan, pending_own

DELAY = 6.0  # seconds until timers 0 and 2 fire: well after the dump
REPORT = re.compile(r"report (main|worker) (.*)")


def ask_report(out: Path, ask: Path, who: str, after: int, byte: str = "x",
               ) -> dict[str, str]:
    """Append ``byte`` to ASK; the fields of ``who``'s next report line after line
    ``after``."""
    with ask.open("a") as f:
        f.write(byte)

    def found() -> str | None:
        for line in read_lines(out)[after:]:
            m = REPORT.fullmatch(line)
            if m and m[1] == who:
                return m[2]
        return None

    line = wait_for_line(out, lambda _: found() is not None, 10, f"a report of {who}")
    del line
    fields = found()
    assert fields is not None
    return dict(item.split("=", 1) for item in fields.split())


def settings_of(report: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in report.items() if not k.startswith("t") or k == "timer_slack"}


def restored_by(mode: str, harness: Harness, tmp_path: Path, proc: subprocess.Popen[bytes],
                monkeypatch: pytest.MonkeyPatch) -> tuple[int, pb.ProcessEntry]:
    """Checkpoint ``proc`` and bring it back by ``mode``: its new pid and the core image."""
    images = harness.images()
    if mode == "migrate":
        port = start_server(tmp_path / "dest")
        token = tmp_path / "token"
        token.write_text("migrate-me\n")
        res = run_ckpt("migrate", "-t", str(proc.pid), "--to", f"127.0.0.1:{port}",
                       "--auth-token-file", token, reap=proc)
        assert res.returncode == 0, res.describe()
        pid = int(re.search(r"as pid (\d+)", res.stdout)[1])  # type: ignore[index]
        harness.track(pid)
        proc.wait(timeout=10)
        cores = sorted((tmp_path / "dest").rglob(f"core-{proc.pid}.img"),
                       key=lambda p: p.stat().st_mtime)
        return pid, ImageDir.open(str(cores[-1].parent)).read_core(proc.pid)
    if mode == "linear-ids":  # restore as on a kernel without PR_TIMER_CREATE_RESTORE_IDS
        monkeypatch.setenv("CKPT_TEST_WITHOUT", "timer-restore-ids")
    if mode == "incremental":
        assert_ckpt_ok(run_ckpt("predump", "-t", str(proc.pid), "-D", images / "1"))
        harness.dump_and_reap(proc, images / "2", "--prev-images-dir", "../1",
                              "--incremental")
        images = images / "2"
    else:
        harness.dump_and_reap(proc, images)
    core = ImageDir.open(str(images)).read_core(proc.pid)
    return harness.restore_detached(images, "--new-pid"), core


@needs_root
@pytest.mark.parametrize("mode", ["dump", "incremental", "migrate", "linear-ids"])
def test_timers_and_settings_survive(harness: Harness, tmp_path: Path, mode: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timer comes back under its id with its clock, signal, value and target
    thread; the armed ones fire after the restore with their signal and value, not
    sooner than the time they had left; one with overruns counts as many; every prctl
    setting reads the same, so do scheduling policy, nice, CPU affinity and I/O priority.
    Under a new pid, so that thread ids are mapped (and no other
    process can take the dumped pid meanwhile). linear-ids: timer ids made as on kernels
    before 6.15 (every id created, the gaps deleted)."""
    out, ask = tmp_path / "out", tmp_path / "ask"
    proc = harness.launch([*py_target("pstate.py"), ask, str(DELAY)], out)
    worker = int(wait_for_line(out, lambda s: s.startswith("ready "), 10, "ready").split()[1])
    before = {who: ask_report(out, ask, who, 1) for who in ("main", "worker")}
    timers_before = read_timers(proc.pid)
    sched_before = [read_sched(proc.pid), read_sched(worker)]
    assert sched_before[1].nice == 7 and sched_before[1].cpus == (0,)
    n = len(read_lines(out))
    t0 = time.monotonic()
    pid, core = restored_by(mode, harness, tmp_path, proc, monkeypatch)
    dumped = {t.id: t for t in core.posix_timers}
    assert sorted(dumped) == [0, 2, 4, 5, 6, 7]
    assert dumped[6].overrun > 0
    if not dumped[0].value_ns or not dumped[2].value_ns:
        pytest.skip("the machine was too slow: the timers fired before the dump")
    assert dumped[4].interval_ns == 1000 * 10**9
    assert {s.name: s.value for s in core.settings}["child_subreaper"] == 1
    assert {s.name: s.value for s in core.threads[1].settings}["timer_slack"] == 654321
    (new_worker,) = thread_ids(pid) - {pid}
    assert pid != proc.pid and new_worker != worker

    # /proc/PID/timers: the same timers, the thread one aimed at the restored worker
    def moved(t: ProcTimer) -> ProcTimer:
        target = new_worker if t.notify & SIGEV_THREAD_ID else pid
        return ProcTimer(t.id, t.signo, t.value, t.notify, target, t.clock)
    assert read_timers(pid) == [moved(t) for t in timers_before]
    assert [read_sched(pid), read_sched(new_worker)] == sched_before

    after = {who: ask_report(out, ask, who, len(read_lines(out))) for who in ("main", "worker")}
    assert settings_of(after["main"]) == settings_of(before["main"])
    assert after["worker"] == before["worker"]
    assert before["worker"]["name"] == "pst-worker"
    assert after["main"]["t4"].startswith("1000000000000/")
    assert after["main"]["t5"] == "0/0/0"
    interval, _, overrun = after["main"]["t6"].split("/")
    assert (int(interval), int(overrun)) == (20_000_000, dumped[6].overrun)
    assert before["main"]["t6"].split("/")[2] == str(dumped[6].overrun)
    for who, timer, sig, value in (("main", 0, 10, 0x1111), ("worker", 2, 36, 0x2222)):
        want = f"fired {who} id={timer} signo={sig} value={value:#x} overrun=0"
        wait_for_line(out, want.__eq__, DELAY + 20, f"timer {timer} to fire")
        fired_at = time.monotonic()
        assert fired_at >= t0 + dumped[timer].value_ns / 1e9 * 0.9, \
            f"timer {timer} fired {fired_at - t0:.2f} s after the checkpoint began, " \
            f"with {dumped[timer].value_ns / 1e9:.2f} s left at the dump"
    early = [s for s in read_lines(out)[:n] if s.startswith(("fired main id=0", "fired worker"))]
    assert not early, "a timer fired before the dump: the test proves nothing"
    # timer 7's signal, pending at the dump, is pending once: its own, not the image's
    # copy beside it (seconds and hundreds of its intervals later)
    assert [timer_of(i) for i in core.shared_pending if signo(i) == 39] == [7]
    assert ask_report(out, ask, "main", len(read_lines(out)), "d")["queued7"] == "1"


@needs_root
@pytest.mark.parametrize("what, says", [
    ("cpu-overrun", "POSIX timer 8, and a restore cannot set its overrun count (a CPU "
                    "clock's timer) again"),
    ("sud", "has syscall_user_dispatch = 0x1, which a restore cannot set again")])
def test_what_a_frozen_target_tells_may_refuse_it(harness: Harness, tmp_path: Path,
                                                  what: str, says: str) -> None:
    """A CPU clock's timer with an overrun count, syscall user dispatch: the dump learns
    them only once the target is frozen, and fails with one line naming them; the target
    runs on untraced, its timers and settings untouched."""
    out, ask = tmp_path / "out", tmp_path / "ask"
    proc = harness.launch([*py_target("pstate.py"), ask, "1000", what], out)
    wait_for_line(out, lambda s: s.startswith("ready "), 10, "ready")
    if what == "cpu-overrun":
        assert any(line.startswith("fired main id=8 ") and not line.endswith(" overrun=0")
                   for line in read_lines(out)), read_lines(out)
    before = ask_report(out, ask, "main", 1)
    images = harness.images()
    message = assert_one_error_line(run_ckpt("dump", "-t", str(proc.pid), "-D", images))
    assert says in message, message
    assert not (images / "inventory.img").exists()
    assert proc.poll() is None
    assert_running_untraced(proc.pid)
    after = ask_report(out, ask, "main", len(read_lines(out)))
    assert settings_of(after) == settings_of(before)
    assert after["t6"].split("/")[2] == before["t6"].split("/")[2]


@needs_root
@pytest.mark.parametrize("point", ["timers-replayed", "timer-replay"])
def test_a_slow_restore_keeps_the_overrun_count(harness: Harness, tmp_path: Path,
                                                point: str) -> None:
    """The restore held for ten intervals of a 20 ms timer with overruns:
    timers-replayed, after its replay: its signals wait, blocked, for the release instead
    of stopping a thread of the stub mid-restore; timer-replay, between reading the clock
    and arming it: the dumped next expiry passes meanwhile, and the replay is done again
    an interval later rather than counting one overrun too many."""
    out, ask = tmp_path / "out", tmp_path / "ask"
    proc = harness.launch([*py_target("pstate.py"), ask, "1000"], out)
    wait_for_line(out, lambda s: s.startswith("ready "), 10, "ready")
    before = ask_report(out, ask, "main", 1)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    pidfile = harness.new_pidfile()
    ckpt = pause_ckpt_at(point, "restore", "-D", images, "--restore-detached",
                         "--pidfile", pidfile, "--new-pid")
    time.sleep(0.2)
    ckpt.send_signal(signal.SIGCONT)
    _, err = ckpt.communicate(timeout=60)
    assert ckpt.returncode == 0, err.decode()
    pid = int(pidfile.read_text())
    harness.track(pid)
    assert_running_untraced(pid)
    after = ask_report(out, ask, "main", len(read_lines(out)))
    assert after["t6"].split("/")[2] == before["t6"].split("/")[2]


# --------------------------------------------------------------------------- pure

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
    call = fake_prctl({prctl.PR_GET_PDEATHSIG: 9, prctl.PR_GET_TIMERSLACK: 77,
                       prctl.PR_SCHED_CORE: 0, prctl.PR_GET_SPECULATION_CTRL: 3},
                      memory)
    inside = prctl.Task(os.getpid(), call, lambda at, n: memory[at][:n], 0x1000,
                        lambda: 0, lambda: 0)
    outside = prctl.Task(os.getpid(), None, None, 0,
                         lambda: prctl.PF_MEMALLOC_NOIO | prctl.PF_LOCAL_THROTTLE, lambda: 0)
    got = {**prctl.read_settings(prctl.Scope.THREAD, inside),
           **prctl.read_settings(prctl.Scope.THREAD, outside)}
    assert got == {"pdeath_signal": 9, "timer_slack": 77, "io_flusher": 1, "sched_core": 0,
                   "syscall_user_dispatch": 0,
                   "spec_store_bypass": 3, "spec_indirect_branch": 3, "spec_l1d_flush": 3}
    assert prctl.refused(got) == []
    assert prctl.refused({**got, "sched_core": 5}) == ["sched_core = 0x5"]
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
    assert prctl.BY_NAME["pdeath_signal"].after_creds
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
