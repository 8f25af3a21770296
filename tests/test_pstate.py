"""POSIX timers, prctl settings and scheduling across dump and restore, on real processes
(examples/targets/pstate.py); the pure tables behind them: tests/test_pstate_tables.py."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    PYTHON,
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
from ckpt.collect.timers import ProcTimer, read_timers
from ckpt.images import ImageDir
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.siginfo import signo
from ckpt.kernel.timers import SIGEV_THREAD_ID, restore_ids_supported, timer_of
from ckpt.restore.timers import linear_problem

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
    ("sud", "has syscall_user_dispatch = 0x1, which a restore cannot set again"),
    ("pdeath", "has pdeath_signal = 0x17, which a restore cannot set again")])
def test_what_a_frozen_target_tells_may_refuse_it(harness: Harness, tmp_path: Path,
                                                  what: str, says: str) -> None:
    """A CPU clock's timer with an overrun count, syscall user dispatch, a thread's
    parent-death signal (SIGURG, in the worker): the dump learns
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


HIGH_TIMER = """
import ctypes, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(77, 1, 0, 0, 0) == 0  # PR_TIMER_CREATE_RESTORE_IDS on
timer = ctypes.c_int(5000)
ev = ctypes.create_string_buffer(struct.pack("qii", 0, 0, 1) + bytes(48))  # SIGEV_NONE
assert libc.syscall(222, 1, ev, ctypes.byref(timer)) == 0, ctypes.get_errno()
assert libc.prctl(77, 0, 0, 0, 0) == 0
print("ready", timer.value, flush=True)
time.sleep(600)
"""


def test_linear_timer_ids_are_judged_by_the_restoring_kernel() -> None:
    """Pure: without kernel help ids above MAX_LINEAR_TIMER_ID are refused; with it, any."""
    assert linear_problem([0, 4096], exact=False) is None
    assert linear_problem([], exact=False) is None
    assert linear_problem([3, 5000], exact=True) is None
    assert "POSIX timer ids up to 5000" in str(linear_problem([3, 5000], exact=False))


@needs_root
def test_linear_ids_restore_refuses_a_high_timer_id_first(harness: Harness, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    """A dump taken where the kernel creates a timer under a given id, restored where it
    cannot: one error line before any process is made, not 5000 timers made and deleted."""
    if not restore_ids_supported():
        pytest.skip("this kernel cannot create a timer under a given id")
    out = tmp_path / "out"
    proc = harness.launch([PYTHON, "-c", HIGH_TIMER], out)
    assert wait_for_line(out, lambda s: s.startswith("ready"), 10, "ready") == "ready 5000"
    images = harness.images()
    harness.dump_and_reap(proc, images)
    monkeypatch.setenv("CKPT_TEST_WITHOUT", "timer-restore-ids")
    line = assert_one_error_line(run_ckpt("restore", "-D", images, "--restore-detached"))
    assert f"process {proc.pid} has POSIX timer ids up to 5000" in line, line
