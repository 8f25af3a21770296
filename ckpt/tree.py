"""A dumped process tree and the plan that rebuilds its shape (pure: no root, no /proc).

A tree is its members in pre-order, root first (Inventory.pids). Restore rebuilds it
top-down: every member but the root is forked by its parent's stub with its own pid
(clone3 set_tid), so ppid and exit_signal come out right by construction. Sessions and
process groups take more care; the technique is CRIU's prepare_pstree_ids:

    born_sid      a member whose session differs from its parent's was forked before
                  the parent's setsid() (or an ancestor's): each process on the way up to
                  the first ancestor in that session is marked "born in S" and forks such
                  children *before* its own setsid
    session       a member reparented to a child subreaper after its session's leader
    helper        and original parent died: a helper with pid = sid, forked by that
                  subreaper, setsid()s, forks the member and exits (the member is
                  reparented to the subreaper again). A leader that is the subreaper's
                  zombie plays the helper itself, dying last as a zombie.
    pgid helper   a group whose leader is gone: a helper with pid = pgid, forked by the
                  group's first member, leads the group while the members join, then
                  exits and is reaped by its parent
    zombies       forked like the others, put in their session and group, then exit
                  with their status; their parent holds them

The plan, in order: forks with setsid between a process's older-session children and the
others (pre-order), group leaders' setpgid(0, 0), the members' setpgid(0, pgid), the
helpers' exits and reaping, the zombies' exits.

The root stays in the restoring ckpt's session and process group when it is a shell job
or not a session leader (as for one process): its dumped sid and pgid then stand for
those, and members that shared them inherit them. A shape no plan can build raises
TreeRefusal (tree_refusal() gives its reason to the dump, before the freeze).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ckpt.errors import ImageError, RestoreError
from ckpt.images.pb import core_pb2 as pb

SIGCHLD = int(signal.SIGCHLD)
# Signals whose default action does not end a process: no zombie died of them.
NOT_FATAL = {int(s) for s in (signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,
                              signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)}


class TreeRefusal(RestoreError):
    """The tree has a shape restore cannot rebuild."""


@dataclass(frozen=True)
class Member:
    pid: int
    ppid: int
    pgid: int
    sid: int
    exit_signal: int = SIGCHLD
    zombie: bool = False
    exit_status: int = 0  # a zombie's wait status
    comm: str = ""
    subreaper: bool = False  # PR_SET_CHILD_SUBREAPER
    tids: tuple[int, ...] = ()

    @classmethod
    def from_entry(cls, e: pb.ProcessEntry) -> Member:
        sub = any(s.name == "child_subreaper" and s.value for s in e.settings)
        return cls(pid=e.pid, ppid=e.ppid, pgid=e.pgid, sid=e.sid, exit_signal=e.exit_signal,
                   zombie=e.zombie, exit_status=e.exit_status, comm=e.comm, subreaper=sub,
                   tids=tuple(t.tid for t in e.threads) or (e.pid,))


class Tree:
    """Members in pre-order, root first; each non-root member's parent comes before it."""

    def __init__(self, members: Sequence[Member]) -> None:
        if not members:
            raise ImageError("a process tree without members")
        self.members = list(members)
        self.by_pid: dict[int, Member] = {}
        self._children: dict[int, list[Member]] = {}
        for m in self.members:
            if m.pid in self.by_pid:
                raise ImageError(f"process {m.pid} is twice in the tree")
            if self.by_pid and m.ppid not in self.by_pid:
                raise ImageError(f"process {m.pid}'s parent {m.ppid} does not come before it "
                                 "in the tree")
            self.by_pid[m.pid] = m
            self._children[m.pid] = []
            if m is not self.members[0]:
                self._children[m.ppid].append(m)

    @classmethod
    def from_entries(cls, entries: Iterable[pb.ProcessEntry]) -> Tree:
        return cls([Member.from_entry(e) for e in entries])

    @property
    def root(self) -> Member:
        return self.members[0]

    def children(self, pid: int) -> list[Member]:
        return list(self._children.get(pid, []))

    def ancestors(self, m: Member) -> list[Member]:
        """m's parent, its parent, ... up to the root."""
        out: list[Member] = []
        while m is not self.root:
            m = self.by_pid[m.ppid]
            out.append(m)
        return out


# ------------------------------------------------------------------ steps
@dataclass(frozen=True)
class Fork:
    parent: int
    pid: int
    exit_signal: int
    helper: bool = False  # a helper: exit_signal 0, exits and is reaped once ids are set


@dataclass(frozen=True)
class Setsid:
    pid: int


@dataclass(frozen=True)
class Setpgid:
    pid: int
    pgid: int


@dataclass(frozen=True)
class Subreaper:
    """PR_SET_CHILD_SUBREAPER before it forks: a session helper's children come back to it."""

    pid: int


@dataclass(frozen=True)
class ExitHelper:
    pid: int
    parent: int  # reaps it


@dataclass(frozen=True)
class Zombie:
    pid: int
    parent: int
    exit_status: int
    exit_signal: int
    comm: str


Step = Fork | Setsid | Setpgid | Subreaper | ExitHelper | Zombie


def helper_pids(plan: Sequence[Step]) -> list[int]:
    return [s.pid for s in plan if isinstance(s, Fork) and s.helper]


@dataclass
class _Node:
    """A process of the restore tree: a member or a helper."""

    pid: int
    sid: int
    pgid: int
    exit_signal: int
    helper: bool = False
    subreaper: bool = False
    setsid: bool = False
    born_sid: int | None = None  # the session it was forked in, when not its final one
    kids: list[_Node] = field(default_factory=list)


def plan_restore(tree: Tree, shell_job: bool) -> list[Step]:
    """The steps that rebuild the tree's shape (see the module docstring); TreeRefusal
    when no plan can."""
    root = tree.root
    keeps = shell_job or root.sid != root.pid  # the root stays in ckpt's session and group
    _check_members(tree, keeps)
    nodes = {m.pid: _Node(m.pid, m.sid, m.pgid, m.exit_signal, subreaper=m.subreaper,
                          setsid=m.sid == m.pid and not (m is root and keeps))
             for m in tree.members}
    for m in tree.members[1:]:
        nodes[m.ppid].kids.append(nodes[m.pid])
    _sessions(tree, nodes, keeps)
    _group_helpers(tree, nodes, keeps)
    steps: list[Step] = []
    _forks(nodes[root.pid], steps)
    ids = _pgids(tree, nodes, keeps)
    exits: list[Step] = [ExitHelper(k.pid, n.pid) for n in _preorder(nodes[root.pid])
                         for k in n.kids if k.helper]
    zombies: list[Step] = [Zombie(m.pid, m.ppid, m.exit_status, m.exit_signal, m.comm)
                           for m in tree.members if m.zombie]
    return steps + ids + exits + zombies


def tree_refusal(tree: Tree, shell_job: bool) -> str | None:
    """Why restore could not rebuild this tree's shape, or None."""
    try:
        plan_restore(tree, shell_job)
    except TreeRefusal as exc:
        return str(exc)
    return None


def _check_members(tree: Tree, keeps: bool) -> None:
    root = tree.root
    for m in tree.members:
        if m.sid == m.pid and m.pgid != m.pid:
            raise TreeRefusal(f"process {m.pid} leads session {m.sid} but is in process group "
                              f"{m.pgid}: not a shape the kernel makes")
        if m.zombie:
            if tree.children(m.pid):
                raise TreeRefusal(f"zombie {m.pid} has children")
            if m is root:
                raise TreeRefusal(f"the root {m.pid} is a zombie")
            status = m.exit_status
            if os.WIFSIGNALED(status):
                if os.WTERMSIG(status) in NOT_FATAL:
                    raise TreeRefusal(f"zombie {m.pid} died of signal {os.WTERMSIG(status)}, "
                                      "which ends no process")
            elif not os.WIFEXITED(status):
                raise TreeRefusal(f"zombie {m.pid} has wait status {status:#x}, no exit")
    groups: dict[int, int] = {}
    for m in tree.members:
        sid = groups.setdefault(m.pgid, m.sid)
        if sid != m.sid:
            raise TreeRefusal(f"process group {m.pgid} spans sessions {sid} and {m.sid}")
    if keeps and root.pgid in tree.by_pid and root.pgid != root.pid:
        raise TreeRefusal(f"the root {root.pid} is in process group {root.pgid} of another "
                          "member but stays in the restoring session")


def _session_chain(tree: Tree, m: Member) -> list[Member]:
    """The ancestors that forked m's line while in m's session: up to (not including) the
    first ancestor whose session is m's. TreeRefusal if there is none."""
    chain: list[Member] = []
    for a in tree.ancestors(m):
        if a.sid == m.sid:
            return chain
        chain.append(a)
    raise TreeRefusal(f"process {m.pid} is in session {m.sid}, which no process of the tree "
                      f"leads or was born in, and its parent {m.ppid} is no child subreaper")


def _sessions(tree: Tree, nodes: dict[int, _Node], keeps: bool) -> None:
    """born_sid marks, and session helpers (added to ``nodes``) for reparented members."""
    root = tree.root
    holder: dict[int, int] = {}  # session helper -> the subreaper that forks it
    for m in tree.members[1:]:
        parent = tree.by_pid[m.ppid]
        if m.sid == m.pid or m.sid == parent.sid:
            continue
        try:
            chain: list[Member] | None = _session_chain(tree, m)
        except TreeRefusal:
            chain = None
        if chain is not None:
            for a in chain:
                n = nodes[a.pid]
                if a is root:
                    raise TreeRefusal(f"process {m.pid} is in session {m.sid}, the root's "
                                      "before its setsid(), which restore cannot give back")
                if n.born_sid is not None and n.born_sid != m.sid:
                    raise TreeRefusal(f"cannot tell whether process {a.pid} was born in "
                                      f"session {n.born_sid} or {m.sid}")
                n.born_sid = m.sid
            continue
        # reparented to a subreaper after its session's leader died: a helper, or the
        # leader itself when it is a zombie of that subreaper (it forks, then dies)
        leader = tree.by_pid.get(m.sid)
        if (leader is not None and not (leader.zombie and leader.ppid == m.ppid)) or (
                keeps and m.sid == root.sid):
            raise TreeRefusal(f"process {m.pid} is in session {m.sid} and was reparented to "
                              f"{m.ppid}; restore rebuilds that only when the session's "
                              f"leader is gone or a zombie of {m.ppid}")
        if not parent.subreaper:
            raise TreeRefusal(f"process {m.pid} is in session {m.sid}, which no process of "
                              f"the tree leads, and its parent {m.ppid} is no child subreaper")
        if leader is not None:
            holder[m.sid] = parent.pid
        elif m.sid not in holder:
            holder[m.sid] = parent.pid
            nodes[m.sid] = _Node(m.sid, m.sid, m.sid, 0, helper=True, setsid=True)
            nodes[parent.pid].kids.append(nodes[m.sid])
        elif holder[m.sid] != parent.pid:
            raise TreeRefusal(f"session {m.sid} has members reparented to both "
                              f"{holder[m.sid]} and {m.ppid}")
        nodes[parent.pid].kids.remove(nodes[m.pid])
        nodes[m.sid].kids.append(nodes[m.pid])


def _group_helpers(tree: Tree, nodes: dict[int, _Node], keeps: bool) -> None:
    """A helper for each process group whose leader is gone, under its first member."""
    for m in tree.members:
        g = m.pgid
        if g in nodes or (keeps and g == tree.root.pgid):
            continue
        nodes[g] = _Node(g, m.sid, g, 0, helper=True)
        nodes[m.pid].kids.append(nodes[g])


def _forks(n: _Node, steps: list[Step]) -> None:
    """n's forks (older-session children first, then setsid, then the others), then each
    child's, in pre-order."""
    if n.subreaper:
        steps.append(Subreaper(n.pid))
    before = [k for k in n.kids if n.setsid and n.born_sid is not None
              and _birth_sid(k) == n.born_sid]
    steps += [Fork(n.pid, k.pid, k.exit_signal, k.helper) for k in before]
    if n.setsid:
        steps.append(Setsid(n.pid))
    steps += [Fork(n.pid, k.pid, k.exit_signal, k.helper) for k in n.kids if k not in before]
    for k in n.kids:
        _forks(k, steps)


def _birth_sid(n: _Node) -> int | None:
    """The session n must be forked in (None: any, it calls setsid() itself)."""
    if n.born_sid is not None:
        return n.born_sid
    return None if n.setsid else n.sid


def _preorder(n: _Node) -> list[_Node]:
    out = [n]
    for k in n.kids:
        out += _preorder(k)
    return out


def _pgids(tree: Tree, nodes: dict[int, _Node], keeps: bool) -> list[Step]:
    """Group leaders' setpgid(0, 0) first, then the members'. Session leaders (setsid)
    lead their group already; the root that stays in ckpt's group, and those that share
    its dumped group, inherit it."""
    firsts: list[Step] = []
    rest: list[Step] = []
    for n in _preorder(nodes[tree.root.pid]):
        if n.setsid or (keeps and (n.pid == tree.root.pid or n.pgid == tree.root.pgid)):
            continue
        if n.pgid == n.pid:
            firsts.append(Setpgid(n.pid, n.pid))
        else:
            rest.append(Setpgid(n.pid, n.pgid))
    return firsts + rest


def preorder(root: int, parent: Mapping[int, int]) -> list[int]:
    """``root`` and every pid whose chain of parents in ``parent`` (pid -> ppid) leads to
    it, each parent before its children, siblings by pid: the order a tree is restored in
    (a parent forks its children). Pids that do not lead to ``root`` are left out."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        if pid != root:
            children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    seen: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in seen:  # a cycle: only a corrupt map has one
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(sorted(children.get(pid, ()), reverse=True))
    return out
