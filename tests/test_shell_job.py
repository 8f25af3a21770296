"""--shell-job: a process on a terminal is dumped with its stdin/out/err marked as the
terminal, and restore hands it the restoring ckpt's own terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

from conftest import (
    Bins,
    Harness,
    assert_one_error_line,
    assert_running_untraced,
    ckpt_command,
    fd_links,
    needs_root,
    run_ckpt,
    wait_for,
)

pytestmark = needs_root


def read_pty(master: int, want: bytes, timeout: float = 10.0) -> bytes:
    """Read from a pty master until ``want`` shows up."""
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                got += os.read(master, 4096)
            except OSError:
                break
    return got


def drain(master: int, quiet: float = 0.3, limit: float = 2.0) -> bytes:
    """What the pty has, until it stays quiet for ``quiet`` s or ``limit`` s have passed."""
    got = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and select.select([master], [], [], quiet)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    return got


def launch_on_pty(bins: Bins) -> tuple[subprocess.Popen[bytes], int]:
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(bins.counter_dyn), "-p", "50"], stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True, close_fds=True)
    os.close(slave)
    return proc, master


def test_terminal_needs_shell_job(bins: Bins, harness: Harness) -> None:
    proc, master = launch_on_pty(bins)
    harness._children.append(proc)
    try:
        read_pty(master, b"n=00000002")
        res = run_ckpt("dump", "-t", str(proc.pid), "-D", harness.images())
        line = assert_one_error_line(res)
        assert "fd 0" in line and "terminal" in line and "--shell-job" in line
        assert_running_untraced(proc.pid)
    finally:
        os.close(master)


def test_shell_job_restores_onto_the_restoring_terminal(bins: Bins, harness: Harness) -> None:
    proc, master = launch_on_pty(bins)
    harness._children.append(proc)
    images = harness.images()
    try:
        read_pty(master, b"n=00000003")
        res = run_ckpt("dump", "-t", str(proc.pid), "-D", images, "--shell-job", reap=proc)
        assert res.returncode == 0, res.describe()
        proc.wait(timeout=10)
        seen = drain(master)
        last = int(seen.rsplit(b"n=", 1)[1][:8])
    finally:
        os.close(master)
    master2, slave2 = pty.openpty()
    tty_name = os.ttyname(slave2)
    restorer = subprocess.Popen([ckpt_command(), "restore", "-D", str(images)],
                                stdin=slave2, stdout=slave2, stderr=slave2, close_fds=True)
    harness._children.append(restorer)
    os.close(slave2)
    try:
        out = read_pty(master2, b"n=", timeout=10)
        time.sleep(0.3)
        out += drain(master2)
        pid = wait_for(lambda: next((p for p in _children_of(restorer.pid)), None), 10,
                       "the restored process")
        harness.track(pid)
        links = fd_links(pid)
        assert [links[fd] for fd in (0, 1, 2)] == [tty_name] * 3, links
        nums = [int(chunk[:8]) for chunk in out.split(b"n=")[1:] if chunk[:8].isdigit()]
        assert len(nums) >= 2, out
        assert nums == list(range(last + 1, last + 1 + len(nums))), (last, nums)
    finally:
        os.close(master2)


def _children_of(ppid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == ppid:
                out.append(int(entry.name))
    return out
