"""The end of a migration on the destination: the restored process waits, stopped, for
the source's Commit.

    RestoreRequest  → restore (warm or full) → RestoreDone{pid}     the copy is stopped
    Commit          → SIGCONT, Ack                                   it runs: migrated
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
    """Restored copies whose connection ended before the Commit."""

    def __init__(self, grace: float = COMMIT_GRACE) -> None:
        self.grace = grace
        self.lock = threading.Lock()
        self.pids: set[int] = set()

    def park(self, pid: int) -> None:
        with self.lock:
            self.pids.add(pid)
        timer = threading.Timer(self.grace, self._expire, args=(pid,))
        timer.daemon = True
        timer.start()
        log.warning("page server: pid %d restored but not committed; killed in %.0f s "
                    "unless the source commits it", pid, self.grace)

    def resume(self, pid: int) -> bool:
        if not self._claim(pid):
            return False
        os.kill(pid, signal.SIGCONT)
        log.info("page server: pid %d committed after its link broke", pid)
        return True

    def _claim(self, pid: int) -> bool:
        with self.lock:
            if pid not in self.pids:
                return False
            self.pids.discard(pid)
            return True

    def _expire(self, pid: int) -> None:
        if self._claim(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            log.warning("page server: pid %d never committed: killed", pid)


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
    threading.Thread(target=_reap, args=(res.pid,), daemon=True).start()
    committed = False
    try:
        conn.send(wire_pb2.RestoreDone(ok=True, pid=res.pid, restore_ms=res.ms, warm=res.warm))
        frame = conn.recv(eof_ok=True)
        committed = frame is not None and isinstance(frame.msg, wire_pb2.Commit)
        if frame is not None and not committed:
            raise TransferError(f"{conn.peer}: expected Commit, got {frame.type.name}")
    finally:
        if committed:
            os.kill(res.pid, signal.SIGCONT)
        else:
            parked.park(res.pid)
    conn.send(wire_pb2.Ack(ok=True))
    log.info("page server: %s migrated in as pid %d (%s restore, %.0f ms)", pass_name, res.pid,
             "warm" if res.warm else "full", res.ms)


def _reap(pid: int) -> None:
    """Restored processes are our children: reap them when they end."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
