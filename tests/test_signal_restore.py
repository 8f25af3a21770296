"""Signal state across a restore: every action (defaults included) and mask, a SIGTRAP
action the stub's own traps must not reset, and the kernel's syscall-restart rules for a
signal that arrives the instant the restored process is let go (ckpt.restore.tasks)."""

from __future__ import annotations

import contextlib
import functools
import os
import pty
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    Bins,
    Harness,
    assert_ckpt_ok,
    assert_running_untraced,
    ckpt_command,
    needs_root,
    proc_status,
    py_target,
    read_lines,
    run_ckpt,
    thread_ids,
    wait_for,
    wait_for_line,
    wait_for_lines,
)

from ckpt.actions.restore import RestoreOptions, restore
from ckpt.images import ImageDir

pytestmark = needs_root

STATUS_KEYS = ("SigIgn", "SigCgt", "SigBlk")
# Restores use --new-pid: which pid is beside the point here, and with 7 test runs on the
# machine at once the old one is sometimes taken (a flaky "could not obtain pid").


def sig_status(pid: int) -> dict[str, str]:
    st = proc_status(pid)
    assert st is not None, f"process {pid} is gone"
    return {key: st[key] for key in STATUS_KEYS}


def reap(pid: int, timeout: float = 10.0) -> int:
    """Wait for pid (our child, or reparented to us as subreaper) to end; its status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return status
        time.sleep(0.01)
    pytest.fail(f"process {pid} did not end")


NR_PAUSE = 34


def in_pause(pid: int) -> bool:
    """Every thread of pid sits in pause() (/proc/PID/task/TID/syscall)."""
    calls = []
    for tid in thread_ids(pid):
        with contextlib.suppress(OSError):
            calls.append(Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()[0])
    return bool(calls) and all(c == str(NR_PAUSE) for c in calls)


def launch_pauser(harness: Harness, pauser: Path, out: Path, *args: str,
                  ) -> subprocess.Popen[bytes]:
    """pauser started, with every thread in pause(): a dump catches it there."""
    proc = harness.launch([pauser, *args], out)
    wait_for_line(out, lambda line: line == "ready", 10, "the target to be ready")
    if args[0] != "read":
        wait_for(lambda: in_pause(proc.pid), 10, "every thread in pause()")
    return proc


@pytest.mark.parametrize("trap", ["trap-handler", "trap-ignored", "trap-blocked"])
def test_every_action_and_mask_survive(harness: Harness, bins: Bins, tmp_path: Path,
                                       trap: str) -> None:
    """SIGTRAP caught (or ignored, or caught and blocked), SIGINT ignored, SIGHUP blocked,
    everything else default: the restored process shows the same SigIgn/SigCgt/SigBlk,
    nothing of the restoring ckpt (its SIGINT handler, SIGPIPE/SIGXFSZ ignored), and each
    action works. The stub's own traps must not reset SIGTRAP's action."""
    out = tmp_path / "out.txt"
    proc = launch_pauser(harness, bins.pauser, out, "pause", trap)
    before = sig_status(proc.pid)
    images = harness.images()
    harness.dump_and_reap(proc, images)

    pid = harness.restore_detached(images, "--new-pid")
    assert_running_untraced(pid)
    assert sig_status(pid) == before
    caught = trap == "trap-handler"
    os.kill(pid, signal.SIGTRAP)
    if caught:
        wait_for_line(out, lambda line: line.startswith("woke=1 errno=4 usr1=0 trap=1 "), 5,
                      "the SIGTRAP handler")
    elif trap == "trap-blocked":
        assert pending(pid) == 1 << (signal.SIGTRAP - 1)
    os.kill(pid, signal.SIGINT)  # ignored: neither wakes it nor kills it
    os.kill(pid, signal.SIGUSR1)
    want = f"woke={1 + caught} errno=4 usr1=1 trap={int(caught)} pid={pid}"
    wait_for_line(out, want.__eq__, 5, "the SIGUSR1 handler")
    assert sig_status(pid) == before
    os.kill(pid, signal.SIGUSR2)
    status = reap(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGUSR2, status


def test_default_actions_keep_flags_mask_and_restorer(harness: Harness, tmp_path: Path,
                                                     ) -> None:
    """Every action is dumped, default ones included: SIG_DFL with CPython's SA_ONSTACK
    and glibc's SA_RESTORER and restorer comes back exactly (a second dump of the
    restored process records the same 62 actions)."""
    out = tmp_path / "out.txt"
    proc = harness.launch(py_target("defaults.py"), out)
    wait_for_lines(out, 2)
    first = harness.images("first")
    harness.dump_and_reap(proc, first)
    acts = {a.signo: a for a in ImageDir.open(str(first)).read_core(proc.pid).sigactions}
    assert len(acts) == 62 and signal.SIGKILL not in acts and signal.SIGSTOP not in acts
    usr2 = acts[signal.SIGUSR2]
    assert usr2.handler == 0 and usr2.flags and usr2.restorer, usr2
    pid = harness.restore_detached(first, "--new-pid", "--skip-file-check")
    again = harness.images("again")
    assert_ckpt_ok(run_ckpt("dump", "-t", str(pid), "-D", again, "--leave-running"))
    redumped = ImageDir.open(str(again)).read_core(pid).sigactions
    assert {a.signo: a for a in redumped} == acts


def test_default_sigint_is_default(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """A process with every action default gets none of the restoring Python's: Ctrl-C
    (SIGINT) ends it with SIGINT, not a SIGSEGV in a handler that pointed into ckpt."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_line(out, bool, 10, "the first line")
    before = sig_status(proc.pid)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    pid = harness.restore_detached(images, "--new-pid")
    assert sig_status(pid) == before
    os.kill(pid, signal.SIGINT)
    status = reap(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT, status


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (a page still mapped somewhere stays).
    For a static target dumped in pause(), the restored process's first instruction
    fetch after the release (at the rewound syscall instruction, in its own text) is then a
    major fault: it is held between the kernel's restart and the syscall long enough for a
    signal sent as the restore returns to land there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a page not yet written back (a binary just built) would stay
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def restore_and_signal(images: Path, how: str) -> int:
    """Restore with a new pid and send SIGUSR1 the moment it is let go; its pid."""
    if how == "cli":
        pidfile = images.parent / "restored.pid"
        assert_ckpt_ok(run_ckpt("restore", "-D", images, "--new-pid", "--restore-detached",
                                "--pidfile", pidfile, "--skip-file-check"))
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGUSR1)
        return pid
    # every copy writes to the same output file: it no longer matches the dump's
    res = restore(RestoreOptions(images_dir=str(images), new_pid=True,
                                 stopped=how == "stopped", skip_file_check=True))
    if how != "testpoint":  # there ckpt sent it, as it resumed the process
        os.kill(res.pid, signal.SIGUSR1)
    if how == "stopped":
        os.kill(res.pid, signal.SIGCONT)
    return res.pid


@pytest.mark.parametrize(("how", "times", "mode"), [
    ("in-process", 100, "pause"), ("stopped", 10, "pause"), ("cli", 10, "pause"),
    ("in-process", 20, "thread"), ("in-process", 30, "cold"), ("testpoint", 30, "cold")])
def test_signal_at_release_interrupts_pause(harness: Harness, bins: Bins, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, how: str,
                                            times: int, mode: str) -> None:
    """Dumped in pause() with a SIGUSR1 handler; each restore gets SIGUSR1 as soon as it
    is released, and pause() returns EINTR every time (the kernel's -ERESTARTNOHAND rule),
    instead of the handler running before a rewound pause() that sleeps on (about one
    restore in 50 did so, ckpt.restore.release). In "thread" mode the one waking is a
    second thread (parked at its own last stop). In "cold" mode the static pauser's pages
    are out of the page cache, so the restarted pause() first waits for a major fault
    (about one restore in 5 did so); with "testpoint" ckpt sends the signal itself right
    after resuming the thread from its park, before or after the restart rewound it."""
    if how == "testpoint":
        monkeypatch.setenv("CKPT_TEST_SIGNAL_AT", f"resumed:{int(signal.SIGUSR1)}")
    out = tmp_path / "out.txt"
    cold = mode == "cold"
    binary = bins.pauser_static if cold else bins.pauser
    proc = launch_pauser(harness, binary, out, mode)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    for _ in range(times):
        if cold:
            evict(binary)
        pid = restore_and_signal(images, how)
        harness.track(pid)
        want = f"woke=1 errno=4 usr1=1 trap=0 pid={pid}"
        wait_for_line(out, want.__eq__, 5, f"an answer from {pid}")
        harness.kill(pid)


def answer_of(pid: int, line: str) -> bool:
    return line.endswith(f" pid={pid}")


def test_ignored_signal_at_release_wakes_nothing(harness: Harness, bins: Bins,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT, which the pauser ignores, sent by ckpt as it resumes each thread from its
    park (it reaches a traced thread all the same) neither wakes pause() nor lets a later
    SIGUSR1 run its handler without EINTR: the first line is SIGUSR1's."""
    monkeypatch.setenv("CKPT_TEST_SIGNAL_AT", f"resumed:{int(signal.SIGINT)}")
    out = tmp_path / "out.txt"
    proc = launch_pauser(harness, bins.pauser_static, out, "cold")
    images = harness.images()
    harness.dump_and_reap(proc, images)
    for _ in range(10):
        evict(bins.pauser_static)
        pid = restore_and_signal(images, "in-process")
        harness.track(pid)
        line = wait_for_line(out, functools.partial(answer_of, pid), 5, f"an answer from {pid}")
        assert line == f"woke=1 errno=4 usr1=1 trap=0 pid={pid}"
        harness.kill(pid)


def test_leave_running_keeps_pause(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """dump --leave-running lets the target go from a syscall-exit stop (after its injected
    syscalls) with its own registers: the kernel still restarts the interrupted pause() on
    PTRACE_DETACH, which sets TIF_SIGPENDING (__ptrace_unlink). Had it not, pause() would
    return ERESTARTNOHAND (514) at once; a signal sent right after is an EINTR."""
    out = tmp_path / "out.txt"
    proc = launch_pauser(harness, bins.pauser, out, "pause")
    for n in (1, 2, 3):
        harness.dump(proc.pid, harness.images(f"images{n}"), "--leave-running")
        proc.send_signal(signal.SIGUSR1)
        want = f"woke={n} errno=4 usr1={n} trap=0 pid={proc.pid}"
        wait_for_line(out, want.__eq__, 5, f"answer {n}")
    assert len([line for line in read_lines(out) if line.startswith("woke=")]) == 3


def test_sa_restart_read_goes_on(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """Dumped blocked in read() on its terminal with an SA_RESTART handler: after restore
    a signal runs the handler and the read goes on (-ERESTARTSYS with SA_RESTART)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(bins.pauser), "read"], stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True, close_fds=True)
    harness._children.append(proc)
    os.close(slave)
    try:
        wait_for(lambda: b"ready" in os.read(master, 4096), 10, "ready")
        images = harness.images()
        assert_ckpt_ok(run_ckpt("dump", "-t", str(proc.pid), "-D", images, "--shell-job",
                                reap=proc))
        proc.wait(timeout=10)
    finally:
        os.close(master)
    master2, slave2 = pty.openpty()
    restorer = subprocess.Popen([ckpt_command(), "restore", "-D", str(images), "-d"],
                                stdin=slave2, stdout=slave2, stderr=slave2, close_fds=True)
    harness._children.append(restorer)
    os.close(slave2)
    try:
        assert restorer.wait(timeout=60) == 0
        pid = proc.pid
        harness.track(pid)
        assert_running_untraced(pid)
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: not pending(pid), 5, "SIGUSR1 to be taken")
        os.write(master2, b"hello\n")
        got = b""
        deadline = time.monotonic() + 5
        while b"usr1=" not in got and time.monotonic() < deadline:
            got += os.read(master2, 4096)
        assert b"read=hello usr1=1" in got, got
        assert_running_untraced(pid)
    finally:
        os.close(master2)


def pending(pid: int) -> int:
    """Signals pending for pid's leader or its process."""
    st = proc_status(pid)
    assert st is not None, f"process {pid} is gone"
    return int(st["ShdPnd"], 16) | int(st["SigPnd"], 16)


def thread_pending(pid: int, tid: int) -> int:
    st = proc_status(pid, tid)
    assert st is not None, f"thread {tid} of {pid} is gone"
    return int(st["SigPnd"], 16)


def test_thread_directed_signal_of_a_worker_survives(harness: Harness, tmp_path: Path) -> None:
    """A SIGUSR1 sent with pthread_kill (SI_TKILL) to a worker thread that blocks it is
    still pending for that thread after dump and restore (only the thread itself may
    queue such a siginfo), and is handled once when the worker unblocks it."""
    out, trigger = tmp_path / "out", tmp_path / "unblock"
    target = harness.launch([*py_target("thread_signal.py"), str(trigger)], out)
    worker = int(wait_for_line(out, lambda line: line.startswith("worker "), 10,
                               "the signal to be pending").split()[1])
    usr1 = 1 << (signal.SIGUSR1 - 1)
    assert thread_pending(target.pid, worker) & usr1
    images = harness.images()
    harness.dump_and_reap(target, images)
    pid = harness.restore_detached(images, "--new-pid")
    (restored,) = thread_ids(pid) - {pid}
    assert thread_pending(pid, restored) & usr1
    assert not thread_pending(pid, pid) & usr1
    n = len(read_lines(out))
    wait_for(lambda: len(read_lines(out)) > n + 2, 10, "the restored process to run")
    assert read_lines(out)[-1] == "handled=0"
    trigger.touch()
    line = wait_for_line(out, lambda line: line != "handled=0" and line.startswith("handled"),
                         10, "the signal to be handled")
    assert line == "handled=1"
    n = len(read_lines(out))
    wait_for(lambda: len(read_lines(out)) > n + 3, 10, "more lines")
    assert read_lines(out)[-1] == "handled=1"
    assert not thread_pending(pid, restored) & usr1


SIGS = re.compile(r"n=(\d+) sigs=(\d+)")


@pytest.mark.parametrize("timer", ["real", "prof"])
def test_interval_timers_survive(harness: Harness, tmp_path: Path, timer: str) -> None:
    """An armed setitimer (ITIMER_REAL: SIGALRM, ITIMER_PROF: SIGPROF, 1 ms) is dumped and
    armed again: the restored process keeps getting its signals."""
    out = tmp_path / "out"
    proc = harness.launch([*py_target("timers.py"), timer], out)
    wait_for_lines(out, 3)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    core = ImageDir.open(str(images)).read_core(proc.pid)
    assert [t.which for t in core.itimers] == [0 if timer == "real" else 2]
    assert core.itimers[0].interval_us == 1000
    n = len(read_lines(out))
    harness.restore_detached(images, "--new-pid", "--skip-file-check")
    lines = wait_for_lines(out, n + 4)

    def sigs(line: str) -> int:
        m = SIGS.fullmatch(line)
        assert m, line
        return int(m[2])

    assert sigs(lines[-1]) > sigs(lines[n]) > sigs(lines[n - 1]), lines[n - 1:]
