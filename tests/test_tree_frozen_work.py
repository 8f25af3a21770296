"""What a tree dump does before its freeze rather than in it (the frozen time of a tree,
bench/tree_freeze.py), run in-process to see the order of the steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import Harness, assert_running_untraced, needs_root, wait_for_lines
from test_tree_dump import COW_TARGET

from ckpt.actions import dump as dump_action
from ckpt.actions import member
from ckpt.collect.cow import cow_shared_bytes
from ckpt.freeze.tree import FrozenTree
from ckpt.images import ImageDir


@needs_root
def test_copy_on_write_is_counted_before_the_freeze(harness: Harness, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The count is a statistic: read with the tree running (before the live pass, the
    freeze and any copy), it costs the freeze nothing, and still finds the shared pages."""
    out = tmp_path / "out.txt"
    proc = harness.launch([sys.executable, "-c", COW_TARGET], out)
    wait_for_lines(out, 1)
    child = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    steps: list[str] = []
    enter = FrozenTree.__enter__

    def counting(pid: int, *args: object) -> int:
        steps.append(f"cow {pid}")
        return cow_shared_bytes(pid, *args)  # type: ignore[arg-type]

    def freezing(self: FrozenTree) -> FrozenTree:
        steps.append("freeze")
        return enter(self)

    monkeypatch.setattr(member, "cow_shared_bytes", counting)
    monkeypatch.setattr(FrozenTree, "__enter__", freezing)
    images = harness.images()
    dump_action.dump(dump_action.DumpOptions(pid=proc.pid, images_dir=str(images),
                                             leave_running=True))
    assert steps == [f"cow {child}", "freeze"]
    stats = ImageDir.open(images).read_inventory().stats
    assert stats.cow_shared_bytes >= 16 << 20
    for pid in (proc.pid, child):
        assert_running_untraced(pid)
