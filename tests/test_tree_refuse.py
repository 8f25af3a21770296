"""A tree with one member ckpt cannot dump (examples/targets/tree_uring.py: an io_uring
fd in the grandchild) is refused whole, before the freeze: dump and predump each print
one line naming the member and the fd, write no image, and every member runs on,
untraced."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_one_error_line,
    assert_tree_untraced,
    needs_root,
    py_target,
    read_lines,
    run_ckpt,
    tree_members,
    wait_for,
    wait_for_line,
    wait_for_tree,
)

pytestmark = needs_root


@pytest.mark.parametrize("action", ["dump", "predump"])
def test_a_member_with_an_io_uring_fd_refuses_the_whole_tree(harness: Harness,
                                                             action: str) -> None:
    out = harness.tmp / "out.txt"
    proc = harness.launch(py_target("tree_uring.py"), out)
    ready = wait_for_line(out, lambda s: s.startswith("ready"), 10, "ready").split()
    root, child, grandchild, fd = (int(x) for x in ready[1:])
    members = wait_for_tree(harness, root, 3)
    assert [m.pid for m in members] == [proc.pid, child, grandchild] == [root, child, grandchild]
    images = harness.images()
    message = assert_one_error_line(run_ckpt(action, "-t", str(root), "-D", images))
    for part in (f"process {grandchild}", f"fd {fd}", "io_uring"):
        assert part in message, message
    assert not (images / "inventory.img").exists()
    assert_tree_untraced(members)
    assert tree_members(root) == members
    at_refusal = ticks(out)
    wait_for(lambda: all(ticks(out)[role] > n for role, n in at_refusal.items()) or None,
             10, "every member ticking on")


def ticks(out: Path) -> dict[str, int]:
    """How many ticks each member wrote so far."""
    roles = [line.split()[0] for line in read_lines(out) if not line.startswith("ready")]
    return {role: roles.count(role) for role in ("root", "child", "grandchild")}
