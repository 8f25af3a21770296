"""eventfds come back with their counter and mode (ckpt/collect/fdkinds/eventfd.py)."""

from __future__ import annotations

from pathlib import Path

from conftest import Asker, Harness, assert_ckpt_ok, run_ckpt, shown_fds

from ckpt.collect.fdkinds.eventfd import parse
from ckpt.collect.fds import FdInfo, parse_fdinfo


def test_parse_eventfd_fdinfo() -> None:
    text = ("pos:\t0\nflags:\t02004002\nmnt_id:\t16\nino:\t1057\n"
            "eventfd-count:  fffffffffffffffe\neventfd-id: 7\neventfd-semaphore: 1\n")
    pos, flags, mnt_id, ino, extra = parse_fdinfo(text)
    info = FdInfo(fd=3, target="anon_inode:[eventfd]", pos=pos, flags=flags, mnt_id=mnt_id,
                  ino=ino, st_mode=0o600, st_dev=15, st_ino=1057, st_rdev=0, st_size=0,
                  extra=extra)
    assert parse(info) == ((1 << 64) - 2, True)


def test_eventfd_counters_survive(harness: Harness, tmp_path: Path) -> None:
    target = Asker(harness, "fd_eventfd.py")
    assert target.ask() == {"plain": 5, "sem": 1, "empty": "EAGAIN"}
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    harness.restore_detached(images)
    # without the checkpoint: plain held 6, the semaphore 2, empty stays empty
    assert target.ask() == {"plain": 6, "sem": 1, "empty": "EAGAIN"}
    assert target.ask() == {"plain": 7, "sem": 1, "empty": "EAGAIN"}
    # the semaphore is empty now: a fourth check blocks in its read, as it would have


def test_show_lists_fd_kinds_with_state(harness: Harness) -> None:
    target = Asker(harness, "fd_eventfd.py")
    images = harness.images()
    fds = shown_fds(harness, target.proc.pid, images)
    kinds = {f["fd"]: (f["type"], f.get("state")) for f in fds}
    assert kinds[3] == ("EVENTFD", {"count": "5"})
    assert kinds[4] == ("EVENTFD", {"count": "3", "semaphore": True})
    assert kinds[5] == ("EVENTFD", None)  # an empty counter: nothing to show
    text = run_ckpt("show", images)
    assert_ckpt_ok(text)
    assert any(line.split()[:4] == ["fd", "4", "->", "anon_inode:[eventfd]"]
               and "eventfd" in line and "semaphore=True" in line
               for line in text.stdout.splitlines()), text.stdout


def test_check_prints_the_table() -> None:
    res = run_ckpt("check")
    assert_ckpt_ok(res)
    lines = [line.strip() for line in res.stdout.splitlines()]
    restored = next(line for line in lines if line.startswith("restored: fds of kind"))
    assert "eventfd" in restored
    assert "refused (fd): a terminal; use --shell-job for fds 0-2" in lines
    assert any(line.startswith("refused (process): process … has child processes")
               for line in lines)
