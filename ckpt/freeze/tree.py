"""Freeze a process tree: the root and every descendant (a first version: each member
frozen in turn, listed again until nothing new appears)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from types import TracebackType

from ckpt.collect import proc
from ckpt.errors import NoSuchProcess, NotDumpable
from ckpt.freeze.seize import SEIZE_ROUNDS, Frozen


def list_tree(root: int, proc_root: str = "/proc") -> list[int]:
    """``root`` and its live descendants, pre-order, children by pid (racy: preflight)."""
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            if pid != root and proc.read_stat(pid, root=proc_root).state in ("Z", "X"):
                continue
            kids = proc.list_children(pid, root=proc_root)
        except NoSuchProcess:
            continue
        out.append(pid)
        todo.extend(reversed(kids))
    return out


class FrozenTree:
    """Every thread of ``root`` and of its descendants stopped under ptrace."""

    def __init__(self, root: int, proc_root: str = "/proc") -> None:
        self.root, self.proc_root = root, proc_root
        self.pids: list[int] = []
        self.zombies: list[int] = []
        self.members: dict[int, Frozen] = {}
        self.ppid: dict[int, int] = {}
        self.frozen_at = 0.0
        self.killed = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> FrozenTree:
        self.frozen_at = time.perf_counter()
        try:
            self._freeze()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _freeze(self) -> None:
        for _ in range(SEIZE_ROUNDS):
            order: list[int] = []
            zombies: list[int] = []
            todo = [self.root]
            new = False
            while todo:
                pid = todo.pop()
                try:
                    stat = proc.read_stat(pid, root=self.proc_root)
                except NoSuchProcess:
                    if pid == self.root:
                        raise
                    continue
                self.ppid[pid] = stat.ppid
                if stat.state in ("Z", "X"):
                    if pid == self.root:
                        raise NotDumpable(f"process {pid} is a zombie")
                    zombies.append(pid)
                    continue
                if pid not in self.members:
                    try:
                        self.members[pid] = self._stack.enter_context(
                            Frozen(pid, self.proc_root))
                    except NoSuchProcess:
                        if pid == self.root:
                            raise
                        continue
                    new = True
                order.append(pid)
                todo.extend(reversed(proc.list_children(pid, root=self.proc_root)))
            if not new:
                self.pids, self.zombies = order, zombies
                return
        raise NotDumpable(f"process tree of {self.root} keeps changing; cannot freeze it")

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()

    def kill(self, then: Callable[[], None] | None = None) -> None:
        """SIGKILL every member; ``then`` runs once every kill is queued."""
        for pid in reversed(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.killed = True
        try:
            if then is not None:
                then()
        finally:
            for pid in reversed(self.pids):
                self.members[pid].kill()
