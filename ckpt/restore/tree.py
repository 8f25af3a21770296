"""Rebuild a tree's shape over stubs: ckpt.tree's plan run step by step, then (after every
member's own restore, ckpt.actions.restore) all released at once.

    forks        each member forked by its parent's stub (Stub.fork_child), same pid
    ids          setsid, setpgid as planned; PR_SET_CHILD_SUBREAPER where a session
                 helper's children must come back
    helpers      exit untraced (exit_signal 0: no signal) and are reaped by a wait4
                 injected into their parent
    zombies      comm set, its parent's dumped cgroups joined (where it was born: its
                 own do not show), its groups and ids set (the stub is root until then),
                 then exit_group(code), or kill(self, sig) after
                 PR_SET_DUMPABLE 0, untraced: the parent stub holds the zombie. The
                 parent's SIGCHLD (its signal-delivery-stop) is swallowed by a waitid
                 (WNOWAIT) injected into it
    release      every member parked first; then each let go, leaves first

While it builds, ckpt is a child subreaper: a failure kills every stub and helper, parents
first, and each orphan comes back to ckpt, which reaps it (no pid left taken). Each is
killed through the pidfd opened at its fork: a member released, or a zombie reaped, may
be gone and its pid another process's by then.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Iterator, Mapping, Sequence

from ckpt.collect.cgroups import join_cgroups
from ckpt.collect.proc import id_holder
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.creds import PR_SET_DUMPABLE
from ckpt.kernel.prctl import PR_GET_CHILD_SUBREAPER, PR_SET_CHILD_SUBREAPER, PR_SET_NAME
from ckpt.kernel.ptrace import signed
from ckpt.kernel.sys import NR, WALL, prctl
from ckpt.restore.creds import restore_ids
from ckpt.restore.process import Parked, release
from ckpt.restore.stub import Stub
from ckpt.tree import (
    ExitHelper,
    Fork,
    Setpgid,
    Setsid,
    Step,
    Subreaper,
    Tree,
    Zombie,
    helper_pids,
)


def check_tree_ids_free(tree: Tree, plan: Sequence[Step]) -> None:
    """Every member's pid and thread ids and every helper's pid, free before any fork."""
    for pid, tid in [*((m.pid, t) for m in tree.members for t in (m.tids or (m.pid,))),
                     *((h, h) for h in helper_pids(plan))]:
        holder = id_holder(tid)
        if holder is not None:
            what = "pid" if tid == pid else "thread id"
            whose = ("a helper's, for a session or group whose leader is gone" if
                     pid not in tree.by_pid else f"of process {pid}" if tid != pid else "")
            raise RestoreError(f"{what} {tid} is taken by {holder[1]}"
                               f"{f' ({whose})' if whose else ''}; a tree is restored with "
                               "its own pids")


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """ckpt a child subreaper meanwhile (as it was after)."""
    was = ctypes.c_int(0)
    prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(was))
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, was.value)


class TreeStubs:
    """The stubs of a tree being built, by pid (members, then helpers while they live)."""

    def __init__(self, root: Stub, cores: Mapping[int, pb.ProcessEntry] | None = None,
                 ) -> None:
        self.cores = cores or {}  # by pid: a zombie's ids, its parent's cgroups
        self.stubs: dict[int, Stub] = {root.pid: root}
        self.order: list[int] = [root.pid]  # forks in order: parents before children
        # let go, not reaped by us: zombies (and helpers meanwhile), with their pidfds
        self.exited: dict[int, Stub] = {}

    def run(self, plan: Sequence[Step]) -> None:
        for step in plan:
            self.step(step)

    def step(self, step: Step) -> None:
        if isinstance(step, Fork):
            child = self.stubs[step.parent].fork_child(step.pid, step.exit_signal)
            self.stubs[step.pid] = child
            self.order.append(step.pid)
        elif isinstance(step, Setsid):
            self.stubs[step.pid].sc(NR.setsid, what=f"setsid in {step.pid}")
        elif isinstance(step, Setpgid):
            self.stubs[step.pid].sc(NR.setpgid, 0, step.pgid,
                                       what=f"setpgid(0, {step.pgid}) in {step.pid}")
        elif isinstance(step, Subreaper):
            self.stubs[step.pid].sc(NR.prctl, PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0,
                                    what=f"PR_SET_CHILD_SUBREAPER in {step.pid}")
        elif isinstance(step, ExitHelper):
            self._let_go(step.pid, NR.exit_group, 0)
            got = self._inject_swallowing(step.parent, set(), NR.wait4, step.pid, 0, WALL, 0)
            if got != step.pid:
                raise RestoreError(f"process {step.parent} could not reap helper {step.pid}: "
                                   f"{os.strerror(-got) if got < 0 else got}")
            self.exited.pop(step.pid).close()  # gone: its pid may be anyone's now
        elif isinstance(step, Zombie):
            self._zombie(step)

    def _zombie(self, z: Zombie) -> None:
        stub = self.stubs[z.pid]
        stub.sc(NR.prctl, PR_SET_NAME, stub.put_str(z.comm[:15]), 0, 0, 0, what="PR_SET_NAME")
        if z.pid in self.cores:
            join_cgroups(z.pid, self.cores[z.parent].cgroups)
            restore_ids(stub, self.cores[z.pid].threads[0].creds)  # validated: there
        if os.WIFSIGNALED(z.exit_status):
            sig = os.WTERMSIG(z.exit_status)
            stub.sc(NR.prctl, PR_SET_DUMPABLE, 0, 0, 0, 0, what="PR_SET_DUMPABLE")
            stub.task.set_sigmask(0)
            self._let_go(z.pid, NR.kill, z.pid, sig)
        else:
            self._let_go(z.pid, NR.exit_group, os.WEXITSTATUS(z.exit_status))
        # its death is there to see once waitid returns; the parent's signal with it
        parent = self.stubs[z.parent]
        parent.task.set_sigmask(0)  # a blocked signal would stay queued: delivered here
        got = self._inject_swallowing(z.parent, {z.exit_signal} - {0}, NR.waitid, os.P_PID,
                                      z.pid, 0, os.WEXITED | os.WNOWAIT | WALL, 0)
        if got != 0:
            raise RestoreError(f"zombie {z.pid} did not die: {os.strerror(-got)}")

    def _let_go(self, pid: int, nr: int, *args: int) -> None:
        """Detach ``pid`` into one last syscall from the gadget (an exit)."""
        stub = self.stubs.pop(pid)
        assert stub.inj is not None
        stub.inj.prepare(nr, args)
        self.exited[pid] = stub
        stub.task.detach()

    def _inject_swallowing(self, pid: int, swallow: set[int], nr: int, *args: int) -> int:
        """One injected syscall whose signal-delivery-stops for ``swallow`` are discarded
        (a child's exit signal): the raw result."""
        stub = self.stubs[pid]
        assert stub.inj is not None
        stub.inj.prepare(nr, args)
        stub.task.cont()
        while True:
            status = stub.task.wait_stop()
            sig = os.WSTOPSIG(status)
            if sig == signal.SIGTRAP and not status >> 16:
                return signed(stub.task.getregs().rax)
            if sig not in swallow or status >> 16:
                raise RestoreError(f"process {pid} stopped by signal {sig} while restoring")
            stub.task.cont()  # signal 0: discarded; an interrupted call restarts

    def members(self, tree: Tree) -> dict[int, Stub]:
        return {m.pid: self.stubs[m.pid] for m in tree.members if not m.zombie}

    def everyone(self) -> list[Stub]:
        """Every stub, those let go too (closed at the end, ckpt.actions.restore)."""
        return [*self.stubs.values(), *self.exited.values()]

    def kill(self) -> None:
        """Kill every stub, parents first; reap each (an orphan comes back to ckpt, the
        subreaper) and every process let go."""
        for pid in self.order:
            stub = self.stubs.get(pid)
            if stub is not None:
                stub.kill()
        for stub in self.exited.values():
            stub.kill()


def release_all(parked: Sequence[Parked]) -> None:
    """Let every parked member go, leaves first (``parked`` in pre-order)."""
    for p in reversed(parked):
        release(p)
