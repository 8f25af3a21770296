"""A process with zombie children (examples/targets/tree_zombies.py): one dead by
exit(7), one killed by SIGTERM. After a restore both are zombies again, children of the
same parent under the same pids, and the parent's waitpid() gives each the status it
would have had without the checkpoint."""

from __future__ import annotations

import contextlib
import os
import secrets
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
from test_cgroups import own_cgroup


@dataclass(frozen=True)
class Zombies:
    proc: subprocess.Popen[bytes]
    out: Path
    control: Path
    exited: int  # the child dead by exit(code)
    killed: int  # the child dead by SIGTERM
    code: int = 7

    def assert_zombies_of(self, parent: int) -> None:
        for pid in (self.exited, self.killed):
            member = read_member(pid)
            assert member is not None and member.state == "Z" and member.ppid == parent, \
                member

    def assert_reaped(self) -> None:
        """The parent, told to, reaps both with their statuses, and ticks on."""
        wait_for_lines(self.out, len(read_lines(self.out)) + 2)
        self.control.touch()
        wait_for_line(self.out, lambda s: s == f"reaped {self.exited} exited={self.code}", 10,
                      f"the exit({self.code}) child reaped")
        wait_for_line(self.out, lambda s: s == f"reaped {self.killed} signaled=15", 10,
                      "the SIGTERM child reaped")
        assert read_member(self.exited) is None and read_member(self.killed) is None
        wait_for_lines(self.out, len(read_lines(self.out)) + 2)


def launch_zombies(harness: Harness, prefix: Sequence[str] = (), code: int = 7,
                   args: Sequence[str] = ()) -> Zombies:
    out, control = harness.tmp / "out.txt", harness.tmp / "reap"
    proc = harness.launch([*prefix, *py_target("tree_zombies.py"), control,
                           "--code", str(code), *args], out)
    _, exited, killed = wait_for_line(out, lambda s: s.startswith("ready"), 10,
                                      "ready").split()
    wait_for_tree(harness, proc.pid, 3)
    zombies = Zombies(proc, out, control, int(exited), int(killed), code)
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


def ids_of(pid: int) -> list[str]:
    """The Uid, Gid and Groups lines of /proc/PID/status."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return [line for line in lines if line.split(":")[0] in ("Uid", "Gid", "Groups")]


@needs_root
def test_a_zombie_keeps_its_ids_and_cgroup(harness: Harness) -> None:
    """In a pids cgroup of its own, a root parent's child took uid and gid 65534 and exited
    with 3. Restored, the zombie is not root (its stub was forked by its parent's, root
    then), it is counted in the cgroup again (its parent's: /proc/Z/cgroup shows only
    roots), and the parent's waitpid gives 3."""
    base = Path("/sys/fs/cgroup/pids")
    if not (base / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy mounted at /sys/fs/cgroup/pids")
    where = base / own_cgroup(os.getpid(), "pids").lstrip("/") / f"ckpt-{secrets.token_hex(4)}"
    where.mkdir()
    try:
        zombies = launch_zombies(harness, code=3, args=["--setuid", "65534",
                                                        "--cgroup", str(where)])
        ids = ids_of(zombies.exited)
        assert ids == ["Uid:\t65534\t65534\t65534\t65534",
                       "Gid:\t65534\t65534\t65534\t65534", "Groups:\t65534 "], ids
        assert (where / "pids.current").read_text() == "3\n"  # the parent, two zombies
        before = tree_ids(zombies.proc.pid)
        images = dump_tree(harness, zombies.proc, "dump")
        root = restore_tree(harness, images, before)
        zombies.assert_zombies_of(root)
        assert ids_of(zombies.exited) == ids
        assert ids_of(zombies.killed)[0].split()[1:] == ["0"] * 4  # root, as it was
        assert (where / "pids.current").read_text() == "3\n"
        zombies.assert_reaped()
    finally:
        harness.cleanup()
        with contextlib.suppress(FileNotFoundError):
            where.rmdir()
