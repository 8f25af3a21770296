"""Files reopened at restore are checked: a regular file that changed since the dump in a
way its fd would not survive (truncated, replaced, rewritten) is refused before anything
is built, naming the fd and the path; `--skip-file-check` restores anyway. An append-only
log that grew is fine."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from conftest import (
    Bins,
    Harness,
    assert_one_error_line,
    assert_running_untraced,
    is_alive,
    needs_root,
    read_lines,
    run_ckpt,
    wait_for_lines,
)

from ckpt.images.pb import core_pb2 as pb
from ckpt.restore.files import file_change

REG = stat.S_IFREG | 0o644


def recorded(flags: int = os.O_WRONLY, size: int = 100, mtime: int = 5) -> pb.OpenFile:
    return pb.OpenFile(id=1, type=pb.OpenFile.REGULAR, path="/x", flags=flags, pos=size,
                       mode=REG, size=size, mtime_ns=mtime, dev=7, inode=11)


def now(size: int = 100, mtime: int = 5, dev: int = 7, ino: int = 11) -> os.stat_result:
    return os.stat_result((REG, ino, dev, 1, 0, 0, size, 0, 0, 0,
                           0, mtime / 1e9, 0, 0, mtime, 0))


def test_file_change_decisions() -> None:
    assert file_change(recorded(), now()) is None
    assert file_change(recorded(), None) == "is missing"
    assert "replaced" in str(file_change(recorded(), now(ino=12)))
    assert file_change(recorded(), now(dev=8, ino=12)) is None  # another host: no inodes
    assert "shrank from 100 to 0" in str(file_change(recorded(), now(size=0, mtime=6)))
    assert "grew" in str(file_change(recorded(), now(size=150, mtime=6)))
    assert "modified" in str(file_change(recorded(), now(mtime=6)))
    # an append-only log and a reader may find the file grown
    assert file_change(recorded(os.O_WRONLY | os.O_APPEND), now(size=150, mtime=6)) is None
    assert file_change(recorded(os.O_RDONLY), now(size=150, mtime=6)) is None
    assert "shrank" in str(file_change(recorded(os.O_WRONLY | os.O_APPEND), now(size=10)))
    # images of older versions recorded no inode: not checked
    old = recorded()
    old.inode = 0
    assert file_change(old, None) is None


@needs_root
def test_truncated_output_is_refused(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """The issue's case: the output file truncated between dump and restore. Restoring
    would write at the old offset (NULs before it): refused, naming fds 1 and 2 and the
    file; nothing is started. --skip-file-check restores it anyway."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 3)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    os.truncate(out, 0)

    res = run_ckpt("restore", "-D", images, "--restore-detached", "--pidfile",
                   harness.new_pidfile())
    message = assert_one_error_line(res)
    assert "fd 1, 2" in message and str(out) in message and "shrank" in message, message
    assert not is_alive(proc.pid), "a process was started"

    pid = harness.restore_detached(images, "--skip-file-check")
    assert pid == proc.pid
    assert_running_untraced(pid)


APPEND_LOG = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
n = 0
while True:
    n += 1
    os.write(fd, b"line %d\\n" % n)
    time.sleep(0.02)
"""


@needs_root
def test_grown_append_only_log_restores(harness: Harness, tmp_path: Path) -> None:
    """A log opened O_APPEND that grew since the dump (another writer appended) is fine:
    the restored process appends after the new lines."""
    log = tmp_path / "app.log"
    proc = harness.launch([sys.executable, "-c", APPEND_LOG, log], tmp_path / "stdout.txt")
    wait_for_lines(log, 3)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    with open(log, "a") as f:
        f.write("rotated-in line\n")

    pid = harness.restore_detached(images)
    assert pid == proc.pid
    lines = wait_for_lines(log, len(read_lines(log)) + 2)
    at = lines.index("rotated-in line")
    assert lines[at + 1].startswith("line "), lines[at - 2:]

