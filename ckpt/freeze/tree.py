"""Freeze a process tree: the root and every live descendant, each as :class:`Frozen`
freezes one process (every thread seized and interrupted, a job-control stop ended and
put back at the release, seccomp suspended, signals held), always released.

    with FrozenTree(root) as tree:      # tree.pids: live members, pre-order, root first
        for pid in tree.pids:
            member = tree.members[pid]  # that member's Frozen: .threads(), .near(), ...
        tree.kill()                     # only when asked to; otherwise __exit__ detaches
                                        # every member and the whole tree runs on

How the set converges (CRIU's collect_pstree technique). A pass walks the tree from the
root; a member not frozen yet is seized whole *before* its children are listed. A fork in
flight completes before its parent stops (the interrupt takes effect on the way back to
user space), so the new child is in the list; and a frozen member forks no more. Passes
repeat until one finds nothing new, at most SEIZE_ROUNDS:

    pass 1:  seize A, list A -> B C;  seize B, list B -> D (forked while A was seized);
             seize D, list D -> Z (state Z: a zombie member, never seized); seize C
    pass 2:  A B D C: no new thread, no new child, nobody gone -> frozen

Exits meanwhile: a child gone before it is seized is skipped; one in state Z is recorded
as a zombie. A seized member that dies (SIGKILLed from outside) is reaped from ptrace's
view and stays a zombie of its frozen parent. A member no pass reaches any more (its
parent died, so it was reparented out of the tree) is released and dropped.

SIGKILL of ckpt while frozen: the kernel detaches every tracee and the tree runs on, as
for one process; only a stopped member's job-control stop is lost (see seize.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from types import TracebackType

from ckpt.collect import proc
from ckpt.errors import CkptError, NoSuchProcess, NotDumpable
from ckpt.freeze.seize import (
    SEIZE_ROUNDS,
    Frozen,
    Handlers,
    install_signal_handlers,
    restore_signal_handlers,
)
from ckpt.kernel import siginfo
from ckpt.tree import preorder

DEAD = ("Z", "X")
CLD_CONTINUED = 6  # si_code of a SIGCHLD for a child continued by SIGCONT
EXIT_WAIT = 2.0  # seconds a dying member's other threads get to finish exiting


def _state(pid: int, proc_root: str) -> str:
    """The letter of /proc/PID/stat's state, "" if the process is gone."""
    try:
        return proc.read_stat(pid, root=proc_root).state
    except NoSuchProcess:
        return ""


def fate(pid: int, proc_root: str = "/proc") -> str:
    """What became of process ``pid``: "live"; "zombie" (every thread dead, not reaped
    yet); "gone"; or "exiting": its leader is dead and another thread is not, yet (SIGKILL
    takes the threads one by one) or ever (the leader called pthread_exit)."""
    state = _state(pid, proc_root)
    if state not in DEAD:
        return "live" if state else "gone"
    try:
        tids = proc.list_tasks(pid, root=proc_root)
    except NoSuchProcess:
        return "gone"
    others = [_task_state(proc_root, pid, t) for t in tids if t != pid]
    return "exiting" if any(s not in ("", *DEAD) for s in others) else "zombie"


def _task_state(proc_root: str, pid: int, tid: int) -> str:
    try:
        text = proc.read_text(pid, proc_root, "task", str(tid), "stat")
    except NoSuchProcess:
        return ""
    return proc.parse_stat(text).state


def list_tree(root: int, proc_root: str = "/proc") -> list[int]:
    """``root`` and its live descendants (zombies left out), pre-order, from
    /proc/PID/task/*/children. Nothing is frozen, so the answer is already old: for a
    preflight look, not for the dump itself."""
    parent = {root: 0}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            kids = proc.list_children(pid, root=proc_root)
        except NoSuchProcess:
            if pid == root:
                raise
            continue  # exited meanwhile
        for kid in kids:
            if kid not in parent and _state(kid, proc_root) not in ("", *DEAD):
                parent[kid] = pid
                todo.append(kid)
    return preorder(root, parent)


class FrozenTree:
    """Context manager holding every thread of ``root`` and its descendants stopped under
    ptrace (see the module docstring)."""

    def __init__(self, root: int, proc_root: str = "/proc") -> None:
        self.root = root
        self.proc_root = proc_root
        self.pids: list[int] = []  # live members, pre-order, root first
        self.zombies: list[int] = []  # members in state Z, never seized, pre-order
        self.members: dict[int, Frozen] = {}
        self.ppid: dict[int, int] = {}  # parent of every member, live or zombie
        self.frozen_at = 0.0
        self.killed = False
        self._zombies: set[int] = set()
        self._old_handlers: Handlers = {}

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> FrozenTree:
        Frozen(self.root, self.proc_root).check()
        if (found := fate(self.root, self.proc_root)) == "zombie":
            raise NotDumpable(f"process {self.root} is a zombie")
        if found == "exiting":
            raise self._leader_gone(self.root)
        self._old_handlers = install_signal_handlers()
        self.frozen_at = time.perf_counter()
        try:
            self._freeze()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._release()

    def _release(self) -> None:
        """Detach every member, leaves first; keep going past a failure, raise the first."""
        errors: list[CkptError] = []
        try:
            if not self.killed:
                order = self._order(self.members)
                order += [pid for pid in self.members if pid not in order]  # never left
                for pid in reversed(order):
                    try:
                        self.members[pid].detach_all()
                    except CkptError as exc:
                        errors.append(exc)
        finally:
            restore_signal_handlers(self._old_handlers)
        if errors:
            raise errors[0]

    def _order(self, pids: Mapping[int, object]) -> list[int]:
        """``pids`` in the pre-order of the whole tree (a zombie's parent is a member)."""
        ordered = preorder(self.root, {**self.ppid, self.root: 0})
        return [pid for pid in ordered if pid in pids]

    # ------------------------------------------------------------------ freeze
    def _freeze(self) -> None:
        self.ppid[self.root] = proc.read_stat(self.root, root=self.proc_root).ppid
        for _ in range(SEIZE_ROUNDS):
            if not self._pass():
                self._drop_our_sigchld()
                self.pids = self._order(self.members)
                self.zombies = self._order(dict.fromkeys(self._zombies))
                return
        raise NotDumpable(f"the process tree of {self.root} keeps changing (processes "
                          "forking or exiting); cannot freeze it")

    def _pass(self) -> bool:
        """One walk from the root, seizing what is new; True if anything changed."""
        changed = False
        reached: set[int] = set()
        todo = [self.root]
        while todo:
            pid = todo.pop()
            reached.add(pid)
            if pid in self._zombies:
                continue
            if pid not in self.members:
                changed = True
                if not self._seize_new(pid):
                    continue
            elif not self._still_alive(pid):
                changed = True
                continue
            elif self._has_new_threads(pid):
                changed = True
                if not self._seize_more(pid):
                    continue
            for kid in self._children(pid):
                self.ppid[kid] = pid
                todo.append(kid)
        for pid in [p for p in self.members if p not in reached]:
            changed = True  # reparented out of the tree (its parent died): not ours
            self.ppid.pop(pid, None)
            with contextlib.suppress(CkptError):
                self.members.pop(pid).detach_all()
        for pid in [p for p in self._zombies if p not in reached]:
            changed = True  # reparented when its parent died, and reaped
            self.ppid.pop(pid, None)
            self._zombies.discard(pid)
        return changed

    def _drop_our_sigchld(self) -> None:
        """Ending a stopped member's group-stop (the SIGCONT of Frozen's end_group_stop)
        sent its parent a SIGCHLD (CLD_CONTINUED) for a continue nobody asked for. A
        frozen parent has it queued even when it ignores SIGCHLD: a dump would save it and
        an injected syscall would stop on it. Dropped if it is the first SIGCHLD queued."""
        stopped = {pid for pid, m in self.members.items() if m.stop_signal}
        for parent in {self.ppid[pid] for pid in stopped} & set(self.members):
            self.members[parent].drop_queued(signal.SIGCHLD, lambda info: (
                siginfo.code(info) == CLD_CONTINUED and siginfo.sender_pid(info) in stopped))

    def _seize_new(self, pid: int) -> bool:
        """Freeze a member found by the walk; False when it is dead (a zombie or gone)."""
        if pid != self.root:
            state = fate(pid, self.proc_root)
            if state == "exiting" and (state := self._settled_fate(pid)) == "live":
                raise self._leader_gone(pid)
            if state != "live":
                return self._bury(pid, state)
        self.members[pid] = Frozen(pid, self.proc_root)
        return self._seize_more(pid)

    def _seize_more(self, pid: int) -> bool:
        """Seize the threads of member ``pid`` not held yet. A member that dies meanwhile
        is buried (False); the root's death, or any other failure, is raised."""
        member = self.members[pid]
        try:
            member.seize()
        except CkptError:
            if pid == self.root:
                raise
            state = self._settled_fate(pid)
            if state == "live":
                raise
            member.reap()
            del self.members[pid]
            return self._bury(pid, fate(pid, self.proc_root))
        return True

    def _still_alive(self, pid: int) -> bool:
        """False, and the member buried, if a frozen member was SIGKILLed meanwhile."""
        if _state(pid, self.proc_root) not in ("", *DEAD):
            return True
        if pid == self.root:
            raise NoSuchProcess(pid, "it exited while being frozen")
        if (state := self._settled_fate(pid)) == "live":
            return True
        self.members.pop(pid).reap()
        return self._bury(pid, fate(pid, self.proc_root) if state == "zombie" else state)

    def _bury(self, pid: int, state: str) -> bool:
        if state == "zombie":
            self._zombies.add(pid)
        else:
            self.ppid.pop(pid, None)
        return False

    def _has_new_threads(self, pid: int) -> bool:
        try:
            tids = proc.list_tasks(pid, root=self.proc_root)
        except NoSuchProcess:
            return True  # dead: _seize_more finds out
        return any(tid not in self.members[pid].tasks for tid in tids)

    def _children(self, pid: int) -> list[int]:
        try:
            return proc.list_children(pid, root=self.proc_root)
        except NoSuchProcess:
            if pid == self.root:
                raise
            return []  # SIGKILLed meanwhile: the next pass buries it

    @staticmethod
    def _leader_gone(pid: int) -> NotDumpable:
        return NotDumpable(f"process {pid}: its main thread has exited while other threads "
                           "run (pthread_exit); cannot freeze it")

    def _settled_fate(self, pid: int) -> str:
        """fate() once the threads of a dying member are done exiting ("live" if they do not
        within EXIT_WAIT: a leader that called pthread_exit, which cannot be frozen)."""
        deadline = time.monotonic() + EXIT_WAIT
        while (state := fate(pid, self.proc_root)) == "exiting" and time.monotonic() < deadline:
            time.sleep(0.002)
        return "live" if state == "exiting" else state

    # ------------------------------------------------------------------ kill
    def kill(self, then: Callable[[], None] | None = None) -> None:
        """SIGKILL every live member, leaves first, and reap the threads ckpt traces.

        ``then`` runs as soon as every SIGKILL is queued: no member can execute another
        instruction. Returns when each member is dead (a zombie is dead enough: its parent,
        or the parent it is reparented to, reaps it)."""
        order = list(reversed(self.pids))
        for pid in order:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.members[pid].killed = True
        self.killed = True
        try:
            if then is not None:
                then()
        finally:
            for pid in order:
                self.members[pid].reap()
            deadline = time.monotonic() + 5.0
            while (any(self.members[p].alive() for p in order)
                   and time.monotonic() < deadline):
                time.sleep(0.002)
