"""A process with zombie children (examples/targets/tree_zombies.py): one dead by
exit(7), one killed by SIGTERM. After a restore both are zombies again, children of the
same parent under the same pids, and the parent's waitpid() gives each the status it
would have had without the checkpoint."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Zombies:
    proc: subprocess.Popen[bytes]
    out: Path
    control: Path
    exited: int  # the child dead by exit(7)
    killed: int  # the child dead by SIGTERM

    def assert_zombies_of(self, parent: int) -> None:
        for pid in (self.exited, self.killed):
            member = read_member(pid)
            assert member is not None and member.state == "Z" and member.ppid == parent, \
                member

    def assert_reaped(self) -> None:
        """The parent, told to, reaps both with their statuses, and ticks on."""
        wait_for_lines(self.out, len(read_lines(self.out)) + 2)
        self.control.touch()
        wait_for_line(self.out, lambda s: s == f"reaped {self.exited} exited=7", 10,
                      "the exit(7) child reaped")
        wait_for_line(self.out, lambda s: s == f"reaped {self.killed} signaled=15", 10,
                      "the SIGTERM child reaped")
        assert read_member(self.exited) is None and read_member(self.killed) is None
        wait_for_lines(self.out, len(read_lines(self.out)) + 2)


def launch_zombies(harness: Harness, prefix: Sequence[str] = ()) -> Zombies:
    out, control = harness.tmp / "out.txt", harness.tmp / "reap"
    proc = harness.launch([*prefix, *py_target("tree_zombies.py"), control], out)
    _, exited, killed = wait_for_line(out, lambda s: s.startswith("ready"), 10,
                                      "ready").split()
    wait_for_tree(harness, proc.pid, 3)
    zombies = Zombies(proc, out, control, int(exited), int(killed))
    zombies.assert_zombies_of(proc.pid)
    return zombies


def test_the_target_reaps_its_zombies_without_a_checkpoint(harness: Harness) -> None:
    """The reference: what the parent does when nothing checkpoints it."""
    launch_zombies(harness).assert_reaped()


@needs_root
@pytest.mark.parametrize("how", TREE_HOWS)
def test_zombies_keep_their_exit_status(harness: Harness, how: str) -> None:
    zombies = launch_zombies(harness)
    before = tree_ids(zombies.proc.pid)
    images = dump_tree(harness, zombies.proc, how)
    root = restore_tree(harness, images, before)
    zombies.assert_zombies_of(root)
    zombies.assert_reaped()
