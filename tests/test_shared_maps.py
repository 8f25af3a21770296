"""Shared memory of one process (issue 10 item 6): anonymous shared memory, a /dev/shm
file and a regular file mapped MAP_SHARED come back with their contents, after a plain
dump and after predumps and an incremental dump (examples/targets/shared_maps.py)."""

from __future__ import annotations

import contextlib
import os

import pytest
from conftest import Asker, Harness, assert_ckpt_ok, run_ckpt

PAGES = 16


def sums(n: int) -> int:
    """Each page's counter after n checks: page p holds n * (p + 1)."""
    return sum(n * (p + 1) for p in range(PAGES))


@pytest.mark.parametrize("how", ["dump", "predump+incremental"])
def test_shared_mappings_survive(harness: Harness, how: str) -> None:
    target = Asker(harness, "shared_maps.py", str(harness.tmp))
    try:
        assert target.ask() == {"anon": sums(1), "shm": sums(1), "file": sums(1),
                                "shm read": 1, "file read": 1}
        if how == "dump":
            images = harness.images()
            harness.dump_and_reap(target.proc, images)
            n = 1
        else:
            pre = harness.images("pre")
            assert_ckpt_ok(run_ckpt("predump", "-t", str(target.proc.pid), "-D", pre))
            target.ask()  # every page written again after the predump
            images = harness.images("final")
            res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", images, "--incremental",
                           "--prev-images-dir", "../pre", reap=target.proc)
            assert_ckpt_ok(res)
            target.proc.wait(timeout=10)
            n = 2
        harness.restore_detached(images)
        assert target.ask() == {"anon": sums(n + 1), "shm": sums(n + 1), "file": sums(n + 1),
                                "shm read": n + 1, "file read": n + 1}
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{target.control.name}")
