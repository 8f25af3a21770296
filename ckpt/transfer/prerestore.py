"""The destination's side of a migration: restore while the rounds come in.

Each pass received with PassStart.prerestore is queued to a worker thread that applies it
to a warm restore (ckpt.restore.warm) while the connection goes on receiving; the final
RestoreRequest waits for the queue, applies the final dump and completes the process.
The worker is the stub's tracer, so every ptrace call happens on it.

A warm restore is an optimization: if applying a pass fails, the worker logs why, drops
the stub, and the final restore runs cold from the images (ckpt.actions.restore).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ckpt.images import ImageDir
from ckpt.restore.warm import WarmRestore

log = logging.getLogger("ckpt.transfer")


@dataclass(frozen=True)
class Restored:
    pid: int
    ms: float
    warm: bool


class Prerestore:
    """One connection's warm restore and the worker thread driving it."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.warm = WarmRestore()
        self.broken = ""  # why the warm restore was given up
        self.jobs: queue.Queue[tuple[Path | None, Future[Restored] | None] | None] = \
            queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"prerestore {peer}",
                                       daemon=True)
        self.thread.start()

    def apply(self, path: Path) -> None:
        """Queue a received pass."""
        self.jobs.put((path, None))

    def finish(self, path: Path) -> Restored:
        """Restore the final dump at ``path``; the process is left stopped (SIGSTOP)."""
        done: Future[Restored] = Future()
        self.jobs.put((path, done))
        return done.result()

    def wait(self) -> str:
        """Until every queued pass is applied; why the warm restore was given up, or ''."""
        done: Future[Restored] = Future()
        self.jobs.put((None, done))
        done.result()
        return self.broken

    def close(self) -> None:
        """End the worker; a stub not yet turned into a process is killed."""
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                path, done = job
                if done is None:
                    assert path is not None
                    self._apply(path)
                    continue
                if path is None:  # wait(): everything before it is done
                    done.set_result(Restored(0, 0.0, warm=self.warm.stub is not None))
                    continue
                try:
                    done.set_result(self._finish(path))
                except BaseException as exc:  # handed to the connection thread
                    done.set_exception(exc)
        finally:
            self.warm.kill()

    def _apply(self, path: Path) -> bool:
        if self.broken:
            return False
        try:
            step = self.warm.apply(path)
        except Exception as exc:  # an optimization only: the final restore goes cold
            self.broken = str(exc) or type(exc).__name__
            self.warm.kill()
            log.warning("page server: %s: warm restore given up at %s (%s); the final "
                        "restore will be a full one", self.peer, path.name, self.broken)
            return False
        log.info("page server: %s: %s applied to the warm restore in %.0f ms (%d pages, "
                 "%d refilled%s)", self.peer, step.name, step.ms, step.pages_written,
                 step.pages_refilled, ", started over" if step.started else "")
        return True

    def _finish(self, path: Path) -> Restored:
        t0 = time.perf_counter()
        if self.warm.stub is not None and self._apply(path):
            pid, _ = self.warm.complete(path, stopped=True)
            return Restored(pid, (time.perf_counter() - t0) * 1000, warm=True)
        from ckpt.actions.restore import RestoreOptions, restore

        root_pid = ImageDir.open(path).read_inventory().root_pid
        res = restore(RestoreOptions(images_dir=str(path), stopped=True,
                                     new_pid=os.path.exists(f"/proc/{root_pid}")))
        return Restored(res.pid, res.total_ms, warm=False)
