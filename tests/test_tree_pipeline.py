"""A shell pipeline dumped and restored whole: `sh -c 'producer | filter > out'`.

The producer (examples/targets/tree_producer.py) writes numbered lines faster than the
filter (tree_filter.py) reads them, so the pipe between them is full at the dump. After
the restore the filter's output must go on from where it was: line i of ``out`` is
transform(i) for every i, across the checkpoint (no gap, no repeat, no torn line).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import termios
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import (
    PYTHON,
    TARGETS,
    TREE_HOWS,
    Harness,
    dump_tree,
    needs_root,
    read_lines,
    restore_tree,
    tree_ids,
    wait_for,
    wait_for_lines,
    wait_for_tree,
)

pytestmark = needs_root

_spec = importlib.util.spec_from_file_location("tree_filter", TARGETS / "tree_filter.py")
assert _spec is not None and _spec.loader is not None
tree_filter = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tree_filter)

PIPE_FULL = 60000  # bytes queued in the 64 KiB pipe: the producer is blocked on it


def start_pipeline(harness: Harness, prefix: Sequence[str] = ()
                   ) -> tuple[subprocess.Popen[bytes], Path]:
    """sh running producer | filter > out, once the pipe is full; the shell and the
    output file."""
    out = harness.tmp / "filtered.txt"
    script = '"$0" "$1" | "$0" "$2" > "$3"'
    proc = harness.launch([*prefix, "sh", "-c", script, PYTHON, TARGETS / "tree_producer.py",
                           TARGETS / "tree_filter.py", out], harness.tmp / "sh.log")
    members = wait_for_tree(harness, proc.pid, 3)
    wait_for_lines(out, 100)
    filt = next(m.pid for m in members[1:]
                if "tree_filter.py" in Path(f"/proc/{m.pid}/cmdline").read_text())
    wait_for(lambda: queued(filt) >= PIPE_FULL or None, 10, "the pipe to fill up")
    return proc, out


def queued(filter_pid: int) -> int:
    """Bytes waiting in the pipe the filter reads (FIONREAD on its stdin, reopened)."""
    fd = os.open(f"/proc/{filter_pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, termios.FIONREAD, buf)
        return int.from_bytes(buf, "little")
    finally:
        os.close(fd)


def check_output(out: Path) -> int:
    """Every complete line of out is transform(i), i = 1, 2, ...; return how many."""
    lines = read_lines(out)
    for i, line in enumerate(lines, 1):
        assert line == tree_filter.transform(i), f"{out} line {i}: {line!r}"
    return len(lines)


def test_pipeline_without_a_checkpoint(harness: Harness) -> None:
    """The reference: the pipe fills up and the output is transform(i) line after line."""
    proc, out = start_pipeline(harness)
    wait_for_lines(out, 600)
    assert check_output(out) >= 600
    assert proc.poll() is None


@pytest.mark.parametrize("how", TREE_HOWS)
def test_pipeline_output_continues_without_gap_or_repeat(harness: Harness, how: str) -> None:
    proc, out = start_pipeline(harness)

    def between() -> None:
        wait_for_lines(out, len(read_lines(out)) + 100)

    before = tree_ids(proc.pid)
    images = dump_tree(harness, proc, how, between)
    at_dump = check_output(out)
    root = restore_tree(harness, images, before)
    assert root == proc.pid
    wait_for_lines(out, at_dump + 500, timeout=30)
    assert check_output(out) >= at_dump + 500
