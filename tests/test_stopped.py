"""A target in a job-control stop (SIGSTOP) is dumped as it is and comes back stopped,
as CRIU does: it never runs while ckpt holds it, --leave-running leaves it stopped, and
a restored copy is stopped (state T, untraced) until a SIGCONT, then goes on exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import (
    Bins,
    Harness,
    check_counter_file,
    needs_root,
    proc_status,
    read_lines,
    run_ckpt,
    thread_ids,
    wait_for,
    wait_for_lines,
)

pytestmark = needs_root


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGSTOP)
    wait_for(lambda: all_stopped(proc.pid), 10, f"process {proc.pid} to stop")


def all_stopped(pid: int) -> bool:
    """Every thread of pid in a job-control stop (T), and none traced."""
    states = [proc_status(pid, tid) for tid in thread_ids(pid)]
    return bool(states) and all(
        st is not None and st["State"].startswith("T") and st["TracerPid"] == "0"
        for st in states)


def test_stopped_target_is_restored_stopped(harness: Harness, bins: Bins,
                                            tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 3)
    stop(proc)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    at_dump = len(read_lines(out))
    show = run_ckpt("show", images)
    assert "(stopped: restored stopped, until SIGCONT)" in show.stdout, show.describe()

    pid = harness.restore_detached(images)
    assert pid == proc.pid
    assert all_stopped(pid), proc_status(pid)
    assert len(read_lines(out)) == at_dump


    os.kill(pid, signal.SIGCONT)
    wait_for_lines(out, at_dump + 3)
    assert set(check_counter_file(out)) == {pid}


THREADED = """
import threading, time, sys
def work():
    while True:
        time.sleep(0.01)
threading.Thread(target=work, daemon=True).start()
n = 0
while True:
    n += 1
    print(n, flush=True)
    time.sleep(0.02)
"""


def test_leave_running_leaves_a_stopped_target_stopped(harness: Harness,
                                                       tmp_path: Path) -> None:
    """dump --leave-running and predump of a stopped two-thread target: still stopped
    and untraced afterwards, and it counts on from where it stopped after SIGCONT."""
    out = tmp_path / "out.txt"
    proc = harness.launch([sys.executable, "-c", THREADED], out)
    wait_for_lines(out, 3)
    assert len(thread_ids(proc.pid)) == 2
    stop(proc)
    at_stop = len(read_lines(out))

    res = run_ckpt("dump", "-t", str(proc.pid), "-D", harness.images("d"), "--leave-running")
    assert res.returncode == 0, res.describe()
    assert all_stopped(proc.pid), [proc_status(proc.pid, t) for t in thread_ids(proc.pid)]
    res = run_ckpt("predump", "-t", str(proc.pid), "-D", harness.images("p"))
    assert res.returncode == 0, res.describe()
    assert all_stopped(proc.pid)
    assert len(read_lines(out)) == at_stop, "the stopped target ran"



    os.kill(proc.pid, signal.SIGCONT)
    lines = wait_for_lines(out, at_stop + 3)
    assert lines == [str(n) for n in range(1, len(lines) + 1)]
