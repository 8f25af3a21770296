"""Members that fork or exit while ckpt freezes their tree (examples/targets/tree_race.py).
ckpt is paused (CKPT_TEST_PAUSE_AT=seized#1) right after it seized the root's thread,
before the other members: then one member forks a child and another exits. The dump
must catch both (the new child seized and dumped, the one that exited dumped as a
zombie with its status), and with --leave-running every member runs on, untraced."""

from __future__ import annotations

import json
import os
import signal

from conftest import (
    Harness,
    assert_ckpt_ok,
    assert_tree_untraced,
    needs_root,
    py_target,
    read_member,
    run_ckpt,
    tree_members,
    wait_for,
    wait_for_line,
    wait_for_tree,
)
from test_killsafe import pause_ckpt_at

pytestmark = needs_root


def test_a_fork_and_an_exit_during_the_freeze_are_caught(harness: Harness) -> None:
    out = harness.tmp / "out.txt"
    proc = harness.launch(py_target("tree_race.py"), out)
    forker, leaver = (int(x) for x in wait_for_line(
        out, lambda s: s.startswith("ready"), 10, "ready").split()[1:])
    root = wait_for_tree(harness, proc.pid, 3)[0].pid
    images = harness.images()
    ckpt = pause_ckpt_at("seized#1", "dump", "-t", str(root), "-D", images, "--leave-running")
    try:
        os.kill(forker, signal.SIGUSR1)
        os.kill(leaver, signal.SIGUSR2)
        members = wait_for_tree(harness, root, 4)
        forked = next(m.pid for m in members if m.ppid == forker)
        wait_for(lambda: getattr(read_member(leaver), "state", "") == "Z" or None, 10,
                 "the leaver to exit")
    finally:
        os.kill(ckpt.pid, signal.SIGCONT)
        _, err = ckpt.communicate(timeout=90)
    assert_tree_untraced(tree_members(root))
    assert ckpt.returncode == 0, err.decode()
    shown = run_ckpt("show", images, "--json")
    assert_ckpt_ok(shown)
    rows = json.loads(shown.stdout)["tree"]
    assert [(r["pid"], r["ppid"], r["state"]) for r in rows[1:]] == [
        (forker, root, "running"), (forked, forker, "running"), (leaver, root, "zombie")], rows
    assert rows[0]["pid"] == root, rows
    assert rows[3]["exit"] == "exit 3", rows[3]
