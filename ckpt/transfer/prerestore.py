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
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ckpt.images import ImageDir
from ckpt.images.siginfo import was_stopped
from ckpt.restore.warm import WarmRestore
from ckpt.transfer.tree import held_by_source, restore_tree_here, tree_entries, wait_ids_free

log = logging.getLogger("ckpt.transfer")
T = TypeVar("T")
# Connections are served concurrently, restores one at a time: each claims exact pids and
# tids, and two at once could take each other's.
_RESTORING = threading.RLock()
QUEUED_PASSES = 4


@dataclass(frozen=True)
class Restored:
    pid: int
    ms: float
    warm: bool
    stopped: bool = False  # dumped in a job-control stop: the commit leaves it stopped
    # a tree: (pid, stays stopped) of every live member, root first, each resumed by the
    # commit; () for one process
    members: tuple[tuple[int, bool], ...] = ()
    # a tree whose pids are held here by the source's own processes: restored only after
    # the source killed them (finish_after_kill); pid is 0
    deferred: bool = False


class Prerestore:
    """One connection's warm restore and the worker thread driving it."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.warm = WarmRestore()
        self.broken = ""  # why the warm restore was given up
        # bounded: a client sending passes faster than they are applied waits for them
        self.jobs: queue.Queue[Callable[[], object] | None] = queue.Queue(QUEUED_PASSES)
        self.thread = threading.Thread(target=self._run, name=f"prerestore {peer}",
                                       daemon=True)
        self.thread.start()

    def apply(self, path: Path) -> None:
        """Queue a received pass."""
        self.jobs.put(lambda: self._apply(path))

    def finish(self, path: Path) -> Restored:
        """Restore the final dump at ``path``; the process is left stopped (SIGSTOP), and
        Restored.stopped says whether it must stay so after the commit."""
        return self._on_worker(lambda: self._finish(path))

    def finish_after_kill(self, path: Path) -> Restored:
        """Restore the tree at ``path`` whose pids the source held (Restored.deferred),
        once they are free, running: the source killed it and committed."""
        return self._on_worker(lambda: self._after_kill(path))

    def wait(self) -> str:
        """Until every queued pass is applied; why the warm restore was given up, or ''."""
        return self._on_worker(lambda: self.broken)

    def close(self) -> None:
        """End the worker; a stub not yet turned into a process is killed."""
        self.jobs.put(None)
        self.thread.join()

    def _on_worker(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker, after everything queued before; its result or error."""
        done: Future[T] = Future()

        def job() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the connection thread
                done.set_exception(exc)

        self.jobs.put(job)
        return done.result()

    def _run(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                job()
        finally:
            self.warm.kill()

    def _apply(self, path: Path) -> bool:
        if self.broken:
            return False
        try:
            with _RESTORING:
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
        with _RESTORING:
            return self._finish_locked(path)

    def _finish_locked(self, path: Path) -> Restored:
        t0 = time.perf_counter()
        images = ImageDir.open(path)
        root_pid = images.read_inventory().root_pid
        entries = tree_entries(images)
        if entries:  # a tree: restored cold, with its pids (ckpt.transfer.tree)
            self.warm.kill()
            if held_by_source(entries):
                return Restored(0, 0.0, warm=False, deferred=True)
            done = restore_tree_here(str(path), entries, stopped=True)
            return Restored(done.pid, (time.perf_counter() - t0) * 1000, warm=False,
                            stopped=done.members[0][1], members=done.members)
        stopped = was_stopped(images.read_core(root_pid))
        if self.warm.stub is not None and self._apply(path):
            pid, _ = self.warm.complete(path, stopped=True)
            return Restored(pid, (time.perf_counter() - t0) * 1000, warm=True, stopped=stopped)
        from ckpt.actions.restore import RestoreOptions, restore

        # the sender keeps its process frozen from this dump until it is committed here,
        # so the files cannot have changed through it (and the warm path does not check)
        res = restore(RestoreOptions(images_dir=str(path), stopped=True,
                                     new_pid=os.path.exists(f"/proc/{root_pid}"),
                                     skip_file_check=True))
        return Restored(res.pid, res.total_ms, warm=False, stopped=stopped)

    def _after_kill(self, path: Path) -> Restored:
        t0 = time.perf_counter()
        entries = tree_entries(ImageDir.open(path))
        with _RESTORING:
            wait_ids_free(entries)
            log.info("page server: %s: %s's pids released by the source after %.0f ms",
                     self.peer, path.name, (time.perf_counter() - t0) * 1000)
            done = restore_tree_here(str(path), entries, stopped=False)
        return Restored(done.pid, (time.perf_counter() - t0) * 1000, warm=False,
                        members=done.members)
