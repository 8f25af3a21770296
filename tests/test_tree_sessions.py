"""Trees over several sessions and process groups (examples/targets/tree_sessions.py):
a setsid() child with a grandchild in a group of its own; and, under a child-subreaper
root, a group and a session whose leaders exited (a restore needs a helper process to
make each, then lets it go). After a restore every member has its pid, parent, group
and session back, and all of them go on writing to the one file they share (one offset:
no NUL hole, no overwritten line)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import (
    TREE_HOWS,
    Harness,
    dump_tree,
    needs_root,
    py_target,
    read_lines,
    read_member,
    restore_tree,
    tree_ids,
    wait_for_line,
    wait_for_lines,
    wait_for_tree,
)

pytestmark = needs_root


def check_ticks(out: Path, roles: tuple[str, ...]) -> dict[str, int]:
    """Each role ticked 1, 2, 3, ... in ``out`` with nothing lost or repeated, and its
    lines are whole; return each role's last tick."""
    assert b"\0" not in out.read_bytes(), f"a NUL hole in {out}"
    seen: dict[str, list[int]] = {role: [] for role in roles}
    for line in read_lines(out):
        if not line.startswith("ready"):
            role, n = line.split()
            seen[role].append(int(n))
    for role, ticks in seen.items():
        assert ticks == list(range(1, len(ticks) + 1)), (role, ticks)
    return {role: len(ticks) for role, ticks in seen.items()}


def dump_and_restore(harness: Harness, proc: subprocess.Popen[bytes], how: str) -> int:
    """Dump the tree and restore it with the same ids; return the root."""
    before = tree_ids(proc.pid)
    return restore_tree(harness, dump_tree(harness, proc, how), before)


def assert_ticking_on(out: Path, roles: tuple[str, ...]) -> None:
    """Each role ticked without a loss or a repeat so far, and every one ticks on."""
    at_restore = check_ticks(out, roles)
    wait_for_lines(out, len(read_lines(out)) + 10 * len(roles))
    after = check_ticks(out, roles)
    assert all(after[role] > at_restore[role] for role in roles), (at_restore, after)


@pytest.mark.parametrize("how", TREE_HOWS)
def test_sessions_and_groups_come_back(harness: Harness, how: str) -> None:
    out = harness.tmp / "out.txt"
    proc = harness.launch(py_target("tree_sessions.py"), out)
    wait_for_line(out, lambda s: s == "ready", 30, "ready")
    members = wait_for_tree(harness, proc.pid, 4)
    leader, grandchild = members[2], members[3]
    assert (leader.sid, leader.pgid) == (leader.pid, leader.pid)
    assert (grandchild.sid, grandchild.pgid) == (leader.pid, grandchild.pid)
    dump_and_restore(harness, proc, how)
    assert_ticking_on(out, ("root", "peer", "leader", "grandchild"))


@pytest.mark.parametrize("how", TREE_HOWS)
def test_groups_and_sessions_whose_leader_exited_come_back(harness: Harness,
                                                          how: str) -> None:
    out = harness.tmp / "out.txt"
    proc = harness.launch([*py_target("tree_sessions.py"), "orphans"], out)
    _, group, session = wait_for_line(out, lambda s: s.startswith("ready"), 30,
                                      "ready").split()
    root, grouped, sessioned = wait_for_tree(harness, proc.pid, 3)
    assert (grouped.ppid, grouped.pgid, grouped.sid) == (root.pid, int(group), root.pid)
    assert (sessioned.ppid, sessioned.pgid, sessioned.sid) == (root.pid, int(session),
                                                               int(session))
    dump_and_restore(harness, proc, how)
    assert_ticking_on(out, ("root", "grouped", "sessioned"))
    assert read_member(int(group)) is None and read_member(int(session)) is None
