"""kill -9 of ckpt at any instant never kills, stops or poisons the target (issue 9.2).

CKPT_TEST_PAUSE_AT=<point>[#N] makes ckpt SIGSTOP itself there (ckpt/testpoint.py); the
test SIGKILLs it and checks the target: alive, not stopped, untraced, no extra fds, its
computation goes on, and a new dump + restore verifies.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import (
    Bins,
    Harness,
    assert_ckpt_ok,
    assert_running_untraced,
    check_counter_file,
    ckpt_command,
    fd_links,
    needs_root,
    proc_status,
    py_target,
    read_lines,
    run_ckpt,
    wait_for,
    wait_for_line,
    wait_for_lines,
)

pytestmark = needs_root
HIGH_FD = 1000
INJECT_POINTS = ["inject-entry#2", "inject-syscall#2", "inject-exit#2"]


def pause_ckpt_at(point: str, *args: str | Path) -> subprocess.Popen[bytes]:
    """Start ckpt and wait until it stopped itself at ``point``."""
    env = {**os.environ, "CKPT_TEST_PAUSE_AT": point}
    proc = subprocess.Popen([ckpt_command(), *map(str, args)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)

    def paused() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"ckpt finished without reaching {point}: "
                        f"{proc.stderr.read().decode() if proc.stderr else ''}")
        st = proc_status(proc.pid)
        return st is not None and st.get("State", "").startswith("T")

    try:
        wait_for(paused, 60, f"ckpt to pause at {point}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def kill_ckpt_at(point: str, *args: str | Path) -> None:
    """Run ckpt until it reaches ``point``, then SIGKILL it."""
    proc = pause_ckpt_at(point, *args)
    proc.kill()
    proc.wait()
    if proc.stderr:
        proc.stderr.close()


def low_fds(pid: int) -> dict[int, str]:
    return {fd: link for fd, link in fd_links(pid).items() if fd < HIGH_FD}


def assert_unharmed(harness: Harness, target: subprocess.Popen[bytes], out: Path,
                    fds: dict[int, str]) -> None:
    assert_running_untraced(target.pid)
    assert low_fds(target.pid) == fds
    n = len(read_lines(out))
    wait_for_lines(out, n + 3)
    check_counter_file(out)
    images = harness.images("after")
    harness.dump_and_reap(target, images)
    pid = harness.restore_detached(images, "--new-pid")
    m = len(read_lines(out))
    wait_for_lines(out, m + 3)
    assert set(check_counter_file(out)) == {target.pid, pid}


def start_counter(harness: Harness, bins: Bins, out: Path) -> subprocess.Popen[bytes]:
    target = harness.launch([bins.counter_dyn, "-p", "5"], out)
    wait_for_lines(out, 3)
    return target


@pytest.mark.parametrize("point", INJECT_POINTS)
def test_kill_during_dump_injection(harness: Harness, bins: Bins, tmp_path: Path,
                                    point: str) -> None:
    out = tmp_path / "out"
    target = start_counter(harness, bins, out)
    fds = low_fds(target.pid)
    kill_ckpt_at(point, "dump", "-t", str(target.pid), "-D", harness.images(), "--leave-running")
    assert_unharmed(harness, target, out, fds)


def fpu_reference(bins: Bins, out: Path) -> None:
    got = read_lines(out)
    ref = subprocess.run([str(bins.fpu), "-w", "20000", "-n", str(len(got))], capture_output=True,
                         text=True, timeout=120, check=True)
    assert got == ref.stdout.splitlines()


@pytest.mark.parametrize("action", ["dump", "predump"])
@pytest.mark.parametrize("point", INJECT_POINTS)
def test_kill_during_injection_busy(harness: Harness, bins: Bins, tmp_path: Path,
                                    point: str, action: str) -> None:
    """A CPU-bound target (not in a syscall: injection goes through foreign code) with
    AVX-512 state live: killed mid-injection, it computes on bit-identically."""
    out = tmp_path / "out"
    target = harness.launch([bins.fpu, "-w", "20000"], out)
    wait_for_lines(out, 3)
    fds = low_fds(target.pid)
    extra = ["--leave-running"] if action == "dump" else ["--track", "uffd-wp"]
    kill_ckpt_at(point, action, "-t", str(target.pid), "-D", harness.images(), *extra)
    assert_running_untraced(target.pid)
    if action == "predump":  # the next pass closes the uffd left at a low fd
        assert_ckpt_ok(run_ckpt("predump", "-t", str(target.pid), "-D",
                                harness.images("p2"), "--track", "uffd-wp"))
    assert low_fds(target.pid) == fds
    wait_for_lines(out, len(read_lines(out)) + 5)
    fpu_reference(bins, out)
    images = harness.images("after")
    harness.dump_and_reap(target, images)
    harness.restore_detached(images, "--new-pid")
    wait_for_lines(out, len(read_lines(out)) + 5)
    fpu_reference(bins, out)


@pytest.mark.parametrize("point", [*INJECT_POINTS, "uffd-created"])
def test_kill_during_first_predump(harness: Harness, bins: Bins, tmp_path: Path,
                                   point: str) -> None:
    """A uffd left at a low fd is recognised and closed by the next pass, with a note."""
    out = tmp_path / "out"
    target = start_counter(harness, bins, out)
    fds = low_fds(target.pid)
    kill_ckpt_at(point, "predump", "-t", str(target.pid), "-D", harness.images("p1"),
                 "--track", "uffd-wp")
    assert_running_untraced(target.pid)
    res = run_ckpt("predump", "-t", str(target.pid), "-D", harness.images("p2"),
                   "--track", "uffd-wp")
    assert_ckpt_ok(res)
    # every point lies after userfaultfd() and before the move of its fd (#2 is fcntl)
    assert "a userfaultfd an earlier ckpt created" in res.stderr, res.describe()
    if low_fds(target.pid) != fds:
        pytest.fail(f"fds before {fds}, after the next pass {low_fds(target.pid)}")
    assert_unharmed(harness, target, out, fds)


def test_kill_during_final_dump_close(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """The last pass of a chain closes the tracker's uffd by injection: killed there."""
    out = tmp_path / "out"
    target = start_counter(harness, bins, out)
    fds = low_fds(target.pid)
    assert_ckpt_ok(run_ckpt("predump", "-t", str(target.pid), "-D", harness.images("p1"),
                            "--track", "uffd-wp"))
    kill_ckpt_at("inject-syscall#1", "dump", "-t", str(target.pid), "-D", harness.images("d"),
                 "--prev-images-dir", "../p1", "--track", "uffd-wp", "--leave-running")
    assert_unharmed(harness, target, out, fds)


def test_predump_kill_leaves_no_stale_note_without_intent(harness: Harness, bins: Bins,
                                                          tmp_path: Path) -> None:
    """A normal predump prints no leftover note."""
    out = tmp_path / "out"
    target = start_counter(harness, bins, out)
    res = run_ckpt("predump", "-t", str(target.pid), "-D", harness.images("p1"),
                   "--track", "uffd-wp")
    assert_ckpt_ok(res)
    assert "userfaultfd an earlier" not in res.stderr


def test_kill_while_throttling(harness: Harness, tmp_path: Path) -> None:
    """migrate --auto-converge killed while the target is SIGSTOPped: the watchdog child
    sends SIGCONT; the target runs on."""
    token = tmp_path / "token"
    token.write_text("t\n")
    log = tmp_path / "server.log"
    harness.launch([ckpt_command(), "page-server", "--address", "127.0.0.1", "--port", "0",
                    "-D", tmp_path / "dest", "--auth-token-file", token], log)
    address = wait_for_line(log, lambda s: "listening" in s, 20, "the page server").split()[-1]
    out = tmp_path / "out.txt"
    target = harness.launch(py_target("dirtier.py"), out)
    wait_for_lines(out, 2, timeout=30)
    kill_ckpt_at("throttled", "migrate", "-t", str(target.pid), "--to", address,
                 "--auth-token-file", token, "--max-rounds", "20", "--max-downtime-ms", "1",
                 "--auto-converge")
    assert_running_untraced(target.pid)
    wait_for_lines(out, len(read_lines(out)) + 2, timeout=30)


SIGS = re.compile(r"n=(\d+) sigs=(\d+)")


def signal_counts(out: Path) -> list[int]:
    found = [SIGS.fullmatch(line) for line in read_lines(out)]
    assert all(found), f"unexpected output in {out}"
    return [int(m[2]) for m in found if m]


@pytest.mark.parametrize("timer", ["prof", "real"])
def test_signals_during_injection(harness: Harness, tmp_path: Path, timer: str) -> None:
    """A 1 ms interval timer's signals reach the target while ckpt injects: each is held
    back and queued again; every dump succeeds and the signals keep coming."""
    out = tmp_path / "out"
    target = harness.launch([*py_target("timers.py"), timer], out)
    wait_for_lines(out, 2)
    for i in range(8):
        harness.dump(target.pid, harness.images(f"d{i}"), "--leave-running")
        assert_running_untraced(target.pid)
    before = signal_counts(out)[-1]
    wait_for(lambda: signal_counts(out)[-1] > before, 10, "more timer signals")
    images = harness.images("final")
    harness.dump_and_reap(target, images)
    harness.restore_detached(images, "--new-pid")
    n = len(read_lines(out))
    wait_for_lines(out, n + 2)


def paused_or_done(proc: subprocess.Popen[bytes]) -> bool:
    st = proc_status(proc.pid) or {}
    return proc.poll() is not None or st.get("State", "").startswith("T")


def test_kill_while_requeueing_signals(harness: Harness, tmp_path: Path) -> None:
    """ckpt killed while it queues held-back signals again, with every signal of the
    thread blocked: the landing's frame gives the thread its own mask back, and the
    timer's signals keep being handled."""
    out = tmp_path / "out"
    target = harness.launch([*py_target("timers.py"), "real"], out)
    wait_for_lines(out, 2)
    blocked = (proc_status(target.pid) or {}).get("SigBlk")
    env = {**os.environ, "CKPT_TEST_PAUSE_AT": "requeue"}
    for attempt in range(20):  # until a timer signal arrives during an injection
        ckpt = subprocess.Popen([ckpt_command(), "dump", "-t", str(target.pid), "-D",
                                 str(harness.images(f"d{attempt}")), "--leave-running"],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for(functools.partial(paused_or_done, ckpt), 60, "ckpt to pause or finish")
        if ckpt.poll() is None:
            break
        assert ckpt.returncode == 0
    else:
        pytest.skip("no timer signal arrived during an injection")
    ckpt.kill()
    ckpt.wait()
    assert_running_untraced(target.pid)
    # untraced and runnable is not yet run: the mask comes back with its rt_sigreturn
    wait_for(lambda: (proc_status(target.pid) or {}).get("SigBlk") == blocked or None, 10,
             f"the target's own signal mask ({blocked}) back")
    before = signal_counts(out)[-1]
    wait_for(lambda: signal_counts(out)[-1] > before, 10, "more timer signals")


@pytest.mark.parametrize("sigs", [(signal.SIGUSR1,), (signal.SIGUSR1, signal.SIGUSR2)],
                         ids=["usr1", "usr1+usr2"])
def test_signals_during_injection_are_delivered_once(harness: Harness, bins: Bins,
                                                     tmp_path: Path,
                                                     sigs: tuple[int, ...]) -> None:
    """Signals sent while ckpt injects one syscall are held back, queued again, handled
    once each. With two, queueing the first must not let it be delivered, and held back
    anew, while the second is being queued."""
    out = tmp_path / "out"
    target = harness.launch([bins.signals, "10"], out)
    wait_for_lines(out, 2)
    ckpt = pause_ckpt_at("inject-entry#2", "dump", "-t", str(target.pid), "-D",
                         harness.images(), "--leave-running")
    for sig in sigs:
        os.kill(target.pid, sig)
    os.kill(ckpt.pid, signal.SIGCONT)
    _, err = ckpt.communicate(timeout=60)
    assert ckpt.returncode == 0, err.decode()
    assert_running_untraced(target.pid)
    n = len(read_lines(out))
    lines = wait_for_lines(out, n + 3)
    want = f"usr1=1 usr2={int(signal.SIGUSR2 in sigs)} "
    assert want in lines[-1], lines[-1]


@pytest.mark.parametrize("mode", ["leave-running", "restored"])
def test_signal_during_seize_is_delivered(harness: Harness, bins: Bins, tmp_path: Path,
                                          mode: str) -> None:
    """A SIGUSR1 that stops the seized task before the interrupt does is delivered before
    the freeze: in the target that runs on, and in the image (it was held for a
    PTRACE_DETACH from the event stop, which drops it, so the restored copy never saw it)."""
    out = tmp_path / "out"
    target = harness.launch([bins.signals, "10"], out)
    wait_for_lines(out, 2)
    images = harness.images()
    extra = ["--leave-running"] if mode == "leave-running" else []
    ckpt = pause_ckpt_at("seized", "dump", "-t", str(target.pid), "-D", images, *extra)
    os.kill(target.pid, signal.SIGUSR1)
    wait_for(lambda: (proc_status(target.pid) or {}).get("State", "").startswith("t") or None,
             10, "the seized target to stop for SIGUSR1")
    os.kill(ckpt.pid, signal.SIGCONT)
    _, err = ckpt.communicate(timeout=60)
    assert ckpt.returncode == 0, err.decode()
    if mode == "leave-running":
        assert_running_untraced(target.pid)
    else:
        target.wait(timeout=30)
        harness.restore_detached(images, "--new-pid", "--skip-file-check")
    n = len(read_lines(out))
    lines = wait_for_lines(out, n + 3)
    assert "usr1=1 " in lines[-1], lines[-1]


@pytest.mark.parametrize("point", ["inject-syscall#8", "inject-exit#9"])
def test_kill_during_injection_into_a_thread(harness: Harness, tmp_path: Path,
                                             point: str) -> None:
    """Injections into a non-leader thread land on that thread's own stack."""
    out = tmp_path / "out"
    target = harness.launch([*py_target("threads.py"), "0.01"], out)
    wait_for_lines(out, 8)
    fds = low_fds(target.pid)
    kill_ckpt_at(point, "dump", "-t", str(target.pid), "-D", harness.images(),
                 "--leave-running")
    assert_running_untraced(target.pid)
    assert low_fds(target.pid) == fds
    n = len(read_lines(out))
    lines = wait_for_lines(out, n + 40)[n:]
    assert {line.split()[0] for line in lines} == {"t0", "t1", "t2", "t3"}


def test_dump_after_a_killed_first_predump(harness: Harness, bins: Bins,
                                           tmp_path: Path) -> None:
    """The uffd a killed predump left at a low fd is ckpt's: a plain dump neither refuses
    it nor gives it to the restored process."""
    out = tmp_path / "out"
    target = start_counter(harness, bins, out)
    fds = low_fds(target.pid)
    kill_ckpt_at("uffd-created", "predump", "-t", str(target.pid), "-D",
                 harness.images("p1"), "--track", "uffd-wp")
    assert low_fds(target.pid) != fds
    images = harness.images("d")
    harness.dump_and_reap(target, images)
    pid = harness.restore_detached(images, "--new-pid")
    assert low_fds(pid) == fds
    wait_for_lines(out, len(read_lines(out)) + 3)
    check_counter_file(out)
