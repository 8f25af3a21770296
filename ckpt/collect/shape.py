"""A tree's shape as /proc shows it (pids, parents, groups, sessions, zombies), for the
check that a restore could build it again (ckpt.tree.tree_refusal) before the freeze.

A member's child-subreaper setting is read only once it is frozen (an injected prctl):
before the freeze every member counts as one (a shape is refused only when no setting
could make it buildable); the frozen check, with the settings read, is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ckpt.collect import proc
from ckpt.errors import NoSuchProcess
from ckpt.tree import Member, Tree, preorder, tree_refusal

WCOREFLAG = 0x80  # in a wait status: the process dumped core


def read_members(pids: Iterable[int], zombies: Iterable[int] = (),
                 subreaper: Mapping[int, bool] | None = None) -> list[Member]:
    """Members (live ``pids`` in pre-order, then ``zombies``) as /proc shows them; a
    process gone meanwhile is left out."""
    out = []
    for pid in [*pids, *zombies]:
        try:
            s = proc.read_stat(pid)
        except NoSuchProcess:
            continue
        zombie = s.state in ("Z", "X")
        out.append(Member(pid=pid, ppid=s.ppid, pgid=s.pgrp, sid=s.session,
                          exit_signal=s.exit_signal, zombie=zombie,
                          exit_status=s.exit_code if zombie else 0, comm=s.comm,
                          subreaper=True if subreaper is None else subreaper.get(pid, False)))
    return out


def zombie_children(pids: Iterable[int]) -> list[int]:
    """The zombie children of ``pids`` (dumped as zombies, never seized)."""
    out = []
    for pid in pids:
        try:
            kids = proc.list_children(pid)
        except NoSuchProcess:
            continue
        for kid in kids:
            try:
                if proc.read_stat(kid).state in ("Z", "X"):
                    out.append(kid)
            except NoSuchProcess:
                continue
    return out


def shape_refusal(members: list[Member], shell_job: bool) -> str | None:
    """Why a restore could not build this tree again, or None (ckpt.tree.plan_restore)."""
    if len(members) < 2:
        return None
    for m in members:
        if m.zombie and m.exit_status & WCOREFLAG:
            return (f"process {m.pid} is a zombie that dumped core (wait status "
                    f"{m.exit_status:#x}): a restore cannot make that status again")
    order = {m.pid: m for m in members}
    ordered = preorder(members[0].pid, {m.pid: m.ppid for m in members})
    return tree_refusal(Tree([order[p] for p in ordered]), shell_job)
