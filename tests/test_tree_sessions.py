"""A tree over two sessions and three process groups (examples/targets/tree_sessions.py):
a setsid() child with a grandchild in a group of its own. After a restore every member
has its pid, parent, group and session back, and all of them go on writing to the one
file they share (one offset: no NUL hole, no overwritten line)."""

from __future__ import annotations

import pytest
from conftest import (
    Harness,
    dump_tree,
    needs_root,
    py_target,
    read_lines,
    restore_tree,
    tree_ids,
    wait_for_line,
    wait_for_lines,
    wait_for_tree,
)

pytestmark = needs_root
ROLES = ("root", "peer", "leader", "grandchild")


def counts(lines: list[str]) -> dict[str, list[int]]:
    """Each role's tick numbers in the order written."""
    seen: dict[str, list[int]] = {role: [] for role in ROLES}
    for line in lines:
        if line != "ready":
            role, n = line.split()
            seen[role].append(int(n))
    return seen


def check_ticks(lines: list[str]) -> dict[str, int]:
    """Each role ticked 1, 2, 3, ... with nothing lost or repeated; its last tick."""
    last = {}
    for role, ticks in counts(lines).items():
        assert ticks == list(range(1, len(ticks) + 1)), (role, ticks)
        last[role] = len(ticks)
    return last


@pytest.mark.xfail(reason="issue 11: `ckpt dump -t` of a tree (W2-W4) and the restore of "
                          "sessions and groups (W5) are not on main yet", strict=False)
@pytest.mark.parametrize("how", ["dump", "predump+incremental"])
def test_sessions_and_groups_come_back(harness: Harness, how: str) -> None:
    out = harness.tmp / "out.txt"
    proc = harness.launch(py_target("tree_sessions.py"), out)
    wait_for_line(out, lambda s: s == "ready", 10, "ready")
    members = wait_for_tree(harness, proc.pid, 4)
    leader, grandchild = members[2], members[3]
    assert (leader.sid, leader.pgid) == (leader.pid, leader.pid)
    assert (grandchild.sid, grandchild.pgid) == (leader.pid, grandchild.pid)
    before = tree_ids(proc.pid)
    images = dump_tree(harness, proc, how)
    at_dump = check_ticks(read_lines(out))
    restore_tree(harness, images, before)
    wait_for_lines(out, len(read_lines(out)) + 40)
    after = check_ticks(read_lines(out))
    assert all(after[role] > at_dump[role] for role in ROLES), (at_dump, after)
    assert b"\0" not in out.read_bytes()
