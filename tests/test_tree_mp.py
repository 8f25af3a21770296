"""A Python multiprocessing run (examples/targets/tree_mp.py: a fork Pool(3), a Queue,
a SharedMemory block, and the resource tracker multiprocessing starts) checkpointed in
its middle: after the restore it finishes with exactly the result of a run nothing
interrupted, and every member then exits."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import (
    TREE_HOWS,
    Harness,
    dump_tree,
    kill_tree,
    needs_root,
    py_target,
    read_lines,
    reap_gone,
    restore_tree,
    tree_ids,
    wait_for_line,
    wait_for_tree,
)

pytestmark = needs_root
MEMBERS = 5  # the main process, the resource tracker, three pool workers


def reference(tmp: Path) -> str:
    """The result line of an uninterrupted run (its gate open from the start)."""
    go = tmp / "go-now"
    go.touch()
    res = subprocess.run([*py_target("tree_mp.py"), str(go)], capture_output=True,
                         text=True, timeout=120, check=True)
    return res.stdout.splitlines()[-1]


@pytest.mark.parametrize("how", TREE_HOWS)
def test_pool_results_equal_an_uninterrupted_run(harness: Harness, how: str,
                                                 request: pytest.FixtureRequest) -> None:
    proc, out, go = launch_mp(harness, request)
    before = tree_ids(proc.pid)
    images = dump_tree(harness, proc, how)
    root = restore_tree(harness, images, before)
    finish_mp(harness, root, before, out, go)


def launch_mp(harness: Harness, request: pytest.FixtureRequest, prefix: Sequence[str] = ()
              ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """tree_mp.py started, its first 20 results in, the rest held at its gate."""
    out, go = harness.tmp / "out.txt", harness.tmp / "go"
    proc = harness.launch([*prefix, *py_target("tree_mp.py"), go], out)
    request.addfinalizer(lambda: Path(f"/dev/shm/ckpt-tree-mp-{proc.pid}").unlink(True))
    request.addfinalizer(lambda: kill_tree(proc.pid))  # the Pool's parent first
    wait_for_tree(harness, proc.pid, MEMBERS)
    wait_for_line(out, lambda s: s == "progress 20", 30, "the first 20 results")
    return proc, out, go


def finish_mp(harness: Harness, root: int, before: set[tuple[int, int, int, int]],
              out: Path, go: Path) -> None:
    """The checkpointed run, its gate opened, ends with the uninterrupted run's result,
    and every member exits."""
    assert not [line for line in read_lines(out) if line.startswith("result")]
    want = reference(harness.tmp)
    assert want.startswith("result ")
    go.touch()
    got = wait_for_line(out, lambda s: s.startswith("result"), 60, "the result")
    assert got == want
    reap_gone([root, *(ids[0] for ids in before)], timeout=30)
