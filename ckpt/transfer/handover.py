"""The end of a migration on the destination: the restored process waits, stopped, for
the source's Commit.

    RestoreRequest  → restore (warm or full) → RestoreDone{pid}     the copy is stopped
    Commit          → SIGCONT, Ack                                   it runs: migrated
                      (a process dumped in a job-control stop gets no SIGCONT: it
                      stays stopped, as any restore leaves it, until someone sends one)
    link lost first → parked, still stopped, for the commit grace period: a Commit{pid}
                      on a new connection resumes it (the source killed its own copy and
                      then lost the link); nothing comes → SIGKILL (the source runs on,
                      or ckpt died on the source)

Never two running copies: the copy here runs only on a Commit, and the source sends it
only once its own copy is dead. A parked copy is stopped and holds no lock a client
could see.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

from ckpt.images.pb import wire_pb2
from ckpt.transfer.prerestore import Prerestore
from ckpt.transfer.wire import Conn, TransferError, check_name

log = logging.getLogger("ckpt.transfer")

COMMIT_GRACE = 30.0  # seconds a restored copy waits for a Commit after its link broke


class Parked:
    """Restored copies whose connection ended before the Commit, each held by a pidfd:
    a copy that died meanwhile is reported as such, and a recycled pid is never
    signalled."""

    def __init__(self, grace: float = COMMIT_GRACE) -> None:
        self.grace = grace
        self.lock = threading.Lock()
        self.pidfds: dict[int, tuple[int, bool]] = {}  # pid → (pidfd, stays stopped)

    def park(self, pid: int, pidfd: int, stopped: bool = False) -> None:
        """Keep ``pid`` stopped for the grace period; takes ownership of its pidfd.
        ``stopped``: it was dumped stopped, and a commit leaves it so."""
        with self.lock:
            self.pidfds[pid] = (pidfd, stopped)
        timer = threading.Timer(self.grace, self._expire, args=(pid,))
        timer.daemon = True
        timer.start()
        log.warning("page server: pid %d restored but not committed; killed in %.0f s "
                    "unless the source commits it", pid, self.grace)

    def resume(self, pid: int) -> str:
        """Let parked ``pid`` run: '' once it does, otherwise why not."""
        claimed = self._claim(pid)
        if claimed is None:
            return f"no restored process {pid} waits here"
        pidfd, stopped = claimed
        try:
            if not send_signal(pidfd, commit_signal(stopped)):
                log.warning("page server: pid %d died before its commit", pid)
                return f"restored process {pid} died before the commit"
        finally:
            os.close(pidfd)
        log.info("page server: pid %d committed after its link broke", pid)
        return ""

    def _claim(self, pid: int) -> tuple[int, bool] | None:
        with self.lock:
            return self.pidfds.pop(pid, None)

    def _expire(self, pid: int) -> None:
        claimed = self._claim(pid)
        if claimed is not None:
            send_signal(claimed[0], signal.SIGKILL)
            os.close(claimed[0])
            log.warning("page server: pid %d never committed: killed", pid)


def commit_signal(stopped: bool) -> int:
    """What a commit sends the restored copy: SIGCONT lets it run; a copy dumped in a
    job-control stop only gets signal 0 (is it alive?) and stays stopped."""
    return 0 if stopped else signal.SIGCONT


def send_signal(pidfd: int, sig: int) -> bool:
    """Signal the process of ``pidfd`` (0: none, only check); False if it is dead
    (exited, or a zombie)."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return os.waitid(os.P_PIDFD, pidfd,
                         os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except (ProcessLookupError, ChildProcessError):
        return False


def restore_for_migration(conn: Conn, root: Path, pass_name: str, pre: Prerestore,
                          parked: Parked) -> None:
    """Restore a pass (completing the warm restore built from the earlier ones, if any)
    and hold the process stopped until the client commits."""
    from ckpt.errors import CkptError

    path = root / check_name(pass_name, "pass")
    try:
        res = pre.finish(path)
    except CkptError as exc:
        conn.send(wire_pb2.RestoreDone(ok=False, error=str(exc)))
        raise TransferError(f"{conn.peer}: restore of {pass_name} failed: {exc}") from None
    pidfd = os.pidfd_open(res.pid)  # our stopped child, not reaped before _reap starts
    threading.Thread(target=_reap, args=(res.pid,), daemon=True).start()
    try:
        conn.send(wire_pb2.RestoreDone(ok=True, pid=res.pid, restore_ms=res.ms, warm=res.warm))
        frame = conn.recv(eof_ok=True)
    except BaseException:
        parked.park(res.pid, pidfd, res.stopped)
        raise
    if frame is None or not isinstance(frame.msg, wire_pb2.Commit):
        parked.park(res.pid, pidfd, res.stopped)
        if frame is None:
            return
        raise TransferError(f"{conn.peer}: expected Commit, got {frame.type.name}")
    try:
        running = send_signal(pidfd, commit_signal(res.stopped))
    finally:
        os.close(pidfd)
    if not running:
        conn.send(wire_pb2.Ack(ok=False, error=f"restored process {res.pid} died before "
                               "the commit"))
        raise TransferError(f"{conn.peer}: {pass_name}: restored process {res.pid} died "
                            "before the commit")
    conn.send(wire_pb2.Ack(ok=True))
    log.info("page server: %s migrated in as pid %d (%s restore, %.0f ms%s)", pass_name,
             res.pid, "warm" if res.warm else "full", res.ms,
             ", stopped as it was dumped" if res.stopped else "")


def _reap(pid: int) -> None:
    """Restored processes are our children: reap them when they end."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
