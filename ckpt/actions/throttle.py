"""--auto-converge: a target that dirties memory faster than the link carries it is
stopped part of the time while a round is sent (ckpt.actions.migrate)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from ckpt import testpoint
from ckpt.collect import proc
from ckpt.errors import CkptError
from ckpt.kernel.sys import pidfd_open, pidfd_send_signal

# Runs in a child of its own session (a Ctrl-C to ckpt's group does not reach it): holds a
# pidfd of every throttled process, says it is ready, and sends them SIGCONT when its stdin
# reaches EOF — when the throttle ends, or when ckpt dies, however it dies.
WATCHDOG = """import os, signal, sys
pidfds = []
for pid in sys.argv[1:]:
    try:
        pidfds.append(os.pidfd_open(int(pid)))
    except ProcessLookupError:
        pass
os.write(1, b"r" if pidfds else b"-")
while os.read(0, 1):
    pass
for pidfd in pidfds:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGCONT)
    except ProcessLookupError:
        pass
"""


class Throttle:
    """Auto-converge: while a round is sent, stop the target ``duty`` of the time
    (SIGSTOP/SIGCONT every PERIOD), so it dirties less than the link carries: one
    process, or every member of a tree (``pids``). It always ends with SIGCONT; a SIGSTOP
    is visible to the target's parent like a job stop (in a tree, to members too).
    A watchdog child (WATCHDOG) holds a pipe from ckpt: if ckpt is killed while the
    target is stopped, the pipe closes and the watchdog sends the SIGCONT.
    A process already in a job-control stop (state T) when the round starts is not
    throttled (if none is left, duty 0): it dirties nothing, and the closing SIGCONT would
    undo its user's stop. (A stop its user sends during a throttled round looks like ours
    and ends with the round.)"""

    PERIOD = 0.05

    def __init__(self, pids: int | Sequence[int], duty: float) -> None:
        self.pids = [pids] if isinstance(pids, int) else list(pids)
        self.pidfds: list[int] = []
        self.duty = duty
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.guard = -1

    def __enter__(self) -> Throttle:
        if self.duty > 0:
            self.pids = [p for p in self.pids if not job_stopped(p)]
            if not self.pids:
                self.duty = 0.0
        if self.duty > 0:
            # pidfds, once: a member that exits meanwhile is never confused with another
            # process that gets its pid
            for pid in self.pids:
                with contextlib.suppress(CkptError):
                    self.pidfds.append(pidfd_open(pid))
            self._start_watchdog()
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _start_watchdog(self) -> None:
        rfd, self.guard = os.pipe2(os.O_CLOEXEC)
        try:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", WATCHDOG, *map(str, self.pids)], stdin=rfd,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(rfd)
        assert self.watchdog.stdout is not None
        if self.watchdog.stdout.read(1) != b"r":
            raise CkptError(f"cannot throttle process {self.pids[0]}: it is gone")

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            self._signal(signal.SIGCONT)
        if self.watchdog is not None:
            os.close(self.guard)
            self.watchdog.wait()
            if self.watchdog.stdout is not None:
                self.watchdog.stdout.close()
        for pidfd in self.pidfds:
            os.close(pidfd)
        self.pidfds.clear()

    def _signal(self, sig: int) -> None:
        for pidfd in self.pidfds:  # a member gone meanwhile is left to the next pass
            pidfd_send_signal(pidfd, sig)

    def _run(self) -> None:
        while not self.stop.is_set():
            self._signal(signal.SIGSTOP)
            testpoint.pause_at("throttled")
            self.stop.wait(self.PERIOD * self.duty)
            self._signal(signal.SIGCONT)
            self.stop.wait(self.PERIOD * (1 - self.duty))


def job_stopped(pid: int) -> bool:
    """Is ``pid`` in a job-control stop (state T; a tracing stop is t)?"""
    try:
        return proc.read_stat(pid).state == "T"
    except CkptError:  # gone: the throttle's first signal says so
        return False
