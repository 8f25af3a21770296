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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckpt.images.pb import wire_pb2
from ckpt.transfer.prerestore import Prerestore, Restored
from ckpt.transfer.wire import Conn, TransferError, check_name

log = logging.getLogger("ckpt.transfer")

COMMIT_GRACE = 30.0  # seconds a restored copy waits for a Commit after its link broke


@dataclass
class Copy:
    """A restored copy waiting for its commit, held by pidfds: a copy that died meanwhile
    is reported as such, and a recycled pid is never signalled. ``others``: a tree's
    other live members, (pid, pidfd, stays stopped) each."""

    pid: int
    pidfd: int
    stopped: bool  # dumped in a job-control stop: a commit leaves it so
    others: list[tuple[int, int, bool]] = field(default_factory=list)

    @classmethod
    def open(cls, res: Restored) -> Copy:
        """Pidfds of the restored process (our child, not reaped before _reap starts)
        and of a tree's other members (stopped, so alive)."""
        copy = cls(res.pid, os.pidfd_open(res.pid), res.stopped)
        try:
            for pid, stopped in res.members[1:]:
                copy.others.append((pid, os.pidfd_open(pid), stopped))
        except BaseException:
            copy.close()
            raise
        return copy

    def resume(self) -> bool:
        """Let it run (every member, leaves first); False if the process is dead."""
        for _, pidfd, stopped in reversed(self.others):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, commit_signal(stopped))
        return send_signal(self.pidfd, commit_signal(self.stopped))

    def kill(self) -> None:
        send_signal(self.pidfd, signal.SIGKILL)  # the others die with it: killed too
        for _, pidfd, _ in self.others:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    def close(self) -> None:
        for fd in [self.pidfd, *(fd for _, fd, _ in self.others)]:
            os.close(fd)


class Parked:
    """Restored copies whose connection ended before the Commit."""

    def __init__(self, grace: float = COMMIT_GRACE) -> None:
        self.grace = grace
        self.lock = threading.Lock()
        self.copies: dict[int, Copy] = {}

    def park(self, copy: Copy) -> None:
        """Keep ``copy`` stopped for the grace period; takes ownership of its pidfds."""
        with self.lock:
            self.copies[copy.pid] = copy
        timer = threading.Timer(self.grace, self._expire, args=(copy.pid,))
        timer.daemon = True
        timer.start()
        log.warning("page server: pid %d restored but not committed; killed in %.0f s "
                    "unless the source commits it", copy.pid, self.grace)

    def resume(self, pid: int) -> str:
        """Let parked ``pid`` run: '' once it does, otherwise why not."""
        copy = self._claim(pid)
        if copy is None:
            return f"no restored process {pid} waits here"
        try:
            if not copy.resume():
                log.warning("page server: pid %d died before its commit", pid)
                return f"restored process {pid} died before the commit"
        finally:
            copy.close()
        log.info("page server: pid %d committed after its link broke", pid)
        return ""

    def _claim(self, pid: int) -> Copy | None:
        with self.lock:
            return self.copies.pop(pid, None)

    def _expire(self, pid: int) -> None:
        copy = self._claim(pid)
        if copy is not None:
            copy.kill()
            copy.close()
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
    path = root / check_name(pass_name, "pass")
    res = _restored(conn, pass_name, lambda: pre.finish(path))
    if res.deferred:
        restore_after_kill(conn, pass_name, lambda: pre.finish_after_kill(path))
        return
    copy = Copy.open(res)
    threading.Thread(target=_reap, args=(res.pid,), daemon=True).start()
    try:
        conn.send(wire_pb2.RestoreDone(ok=True, pid=res.pid, restore_ms=res.ms, warm=res.warm))
        frame = conn.recv(eof_ok=True)
    except BaseException:
        parked.park(copy)
        raise
    if frame is None or not isinstance(frame.msg, wire_pb2.Commit):
        parked.park(copy)
        if frame is None:
            return
        raise TransferError(f"{conn.peer}: expected Commit, got {frame.type.name}")
    try:
        running = copy.resume()
    finally:
        copy.close()
    if not running:
        conn.send(wire_pb2.Ack(ok=False, error=f"restored process {res.pid} died before "
                               "the commit"))
        raise TransferError(f"{conn.peer}: {pass_name}: restored process {res.pid} died "
                            "before the commit")
    conn.send(wire_pb2.Ack(ok=True))
    log.info("page server: %s migrated in as pid %d (%s restore, %.0f ms%s)", pass_name,
             res.pid, "warm" if res.warm else "full", res.ms,
             ", stopped as it was dumped" if res.stopped else "")


def restore_after_kill(conn: Conn, pass_name: str, finish: Callable[[], Restored]) -> None:
    """A tree whose pids its source holds here (ckpt.transfer.tree): RestoreDone{pid=0}
    asks the source to kill it first; its Commit has it restored, running, and the Ack
    says whether that worked (Ack{ok=false}: nothing of it runs here, the source may
    restore it again). A link lost before the Commit restores nothing: the source keeps
    its images."""
    conn.send(wire_pb2.RestoreDone(ok=True, pid=0))
    frame = conn.recv(eof_ok=True)
    if frame is None:
        log.warning("page server: %s: the source hung up before killing its tree; nothing "
                    "restored", pass_name)
        return
    if not isinstance(frame.msg, wire_pb2.Commit):
        raise TransferError(f"{conn.peer}: expected Commit, got {frame.type.name}")
    res = _restored(conn, pass_name, finish, reply=wire_pb2.Ack)
    threading.Thread(target=_reap, args=(res.pid,), daemon=True).start()
    conn.send(wire_pb2.Ack(ok=True))
    log.info("page server: %s migrated in as a tree of %d processes, root pid %d (restored "
             "after the source's kill, %.0f ms)", pass_name, len(res.members), res.pid, res.ms)


def _restored(conn: Conn, pass_name: str, finish: Callable[[], Restored],
              reply: type[wire_pb2.RestoreDone] | type[wire_pb2.Ack] = wire_pb2.RestoreDone,
              ) -> Restored:
    """finish(); a restore error is sent back as ``reply`` {ok=false} and raised."""
    from ckpt.errors import CkptError

    try:
        return finish()
    except CkptError as exc:
        conn.send(reply(ok=False, error=str(exc)))
        raise TransferError(f"{conn.peer}: restore of {pass_name} failed: {exc}") from None


def _reap(pid: int) -> None:
    """Restored processes are our children: reap them when they end."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
