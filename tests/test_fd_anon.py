"""epoll sets, timerfds, signalfds and inotify watches come back with their state
(ckpt/collect/fdkinds/{epoll,timerfd,signalfd,inotify}.py); examples/targets/fd_anon.py
answers the same question before the dump and after the restore."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from conftest import (
    Asker,
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    needs_root,
    run_ckpt,
)
from test_validate import process

from ckpt.collect.fdkinds import epoll, inotify, signalfd, timerfd
from ckpt.collect.fds import FdInfo, parse_fdinfo
from ckpt.errors import ImageError, NotDumpable
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.validate import problems, validate


def info_of(text: str, target: str) -> FdInfo:
    pos, flags, mnt_id, ino, extra = parse_fdinfo(text)
    return FdInfo(fd=5, target=target, pos=pos, flags=flags, mnt_id=mnt_id, ino=ino,
                  st_mode=0o600, st_dev=16, st_ino=1038, st_rdev=0, st_size=0, extra=extra)


HEAD = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n"

# --------------------------------------------------------------------------- parsers


def test_parse_epoll_fdinfo() -> None:
    text = HEAD + (
        "tfd:        5 events: 80000019 data:                5  pos:0 ino:40e sdev:10\n"
        "tfd:        4 events: 40000000 data: 1111222233334444  pos:0 ino:40e sdev:10\n")
    a, b = epoll.parse(info_of(text, "anon_inode:[eventpoll]"))
    assert (a.tfd, a.events, a.data, a.ino, a.sdev) == (5, 0x80000019, 5, 0x40E, 0x10)
    assert not a.disarmed  # edge-triggered, armed
    assert (b.tfd, b.data) == (4, 0x1111222233334444) and b.disarmed  # a fired EPOLLONESHOT


def test_epoll_refusals() -> None:
    armed = epoll.Watch(tfd=4, events=0x19, data=0, ino=1, sdev=1)
    fired = epoll.Watch(tfd=6, events=epoll.EPOLLONESHOT, data=0, ino=1, sdev=1)
    info = info_of(HEAD, "anon_inode:[eventpoll]")
    assert epoll.refuse(info, [epoll.Found(armed, True), epoll.Found(fired, True)], None) is None
    closed = epoll.refuse(info, [epoll.Found(armed, False)], None)
    assert closed is not None and "watches fd 4, which was closed since" in closed
    unready = epoll.refuse(info, [epoll.Found(fired, True, ready=False)], None)
    assert unready is not None and "fd 6 is ready for no event" in unready
    nested = epoll.refuse(info, [epoll.Found(fired, True, nested=True)], None)
    assert nested is not None and "(an epoll set)" in nested
    # an armed registration of another epoll set, or of a file not ready, is fine
    assert epoll.refuse(info, [epoll.Found(armed, True, ready=False, nested=True)], None) is None


def test_parse_timerfd_fdinfo() -> None:
    text = HEAD + ("clockid: 1\nticks: 4\nsettime flags: 03\nit_value: (2, 50390369)\n"
                   "it_interval: (0, 100000000)\n")
    s = timerfd.parse(info_of(text, "anon_inode:[timerfd]").extra)
    assert s == timerfd.TimerState(clockid=1, ticks=4, settime_flags=3,
                                   value_ns=2_050_390_369, interval_ns=100_000_000)


def test_timerfd_arming() -> None:
    rel = pb.TimerFd(clockid=1, value_ns=5, interval_ns=0, clock_ns=1000)
    assert timerfd.arming(rel) == (0, 5, 0)
    assert timerfd.arming(pb.TimerFd(clockid=1)) == (0, 0, 0)  # disarmed stays disarmed
    assert timerfd.arming(pb.TimerFd(clockid=1, interval_ns=7)) == (0, 1, 7)  # due now
    wall = pb.TimerFd(clockid=0, settime_flags=3, value_ns=5, clock_ns=1000)
    assert timerfd.arming(wall) == (3, 1005, 0)  # the same wall-clock time
    mono_abs = pb.TimerFd(clockid=1, settime_flags=1, value_ns=5, clock_ns=1000)
    assert timerfd.arming(mono_abs) == (0, 5, 0)  # time left


def test_parse_signalfd_fdinfo() -> None:
    info = info_of(HEAD + "sigmask:\t0000000000000a00\n", "anon_inode:[signalfd]")
    assert signalfd.parse(info) == (1 << 9) | (1 << 11)  # SIGUSR1, SIGUSR2


def test_parse_inotify_fdinfo() -> None:
    text = HEAD + ("inotify wd:1a ino:3f7e8 sdev:fe00001 mask:100 ignored_mask:0 "
                   "fhandle-bytes:8 fhandle-type:1 f_handle:e8f7030000000000\n"
                   "inotify wd:3 ino:2 sdev:10 mask:40000100 ignored_mask:0 "
                   "fhandle-bytes:8 fhandle-type:1 f_handle:0200000000000000\n")
    low, high = inotify.parse(info_of(text, "anon_inode:inotify"))
    assert (low.wd, low.ino, low.dev, low.mask) == (3, 2, os.makedev(0, 0x10), 0x40000100)
    assert (high.wd, high.dev, high.handle_type) == (0x1A, os.makedev(0xFE, 1), 1)
    assert high.handle == bytes.fromhex("e8f7030000000000")


def test_inotify_mount_points_and_refusals() -> None:
    mountinfo = ("22 27 0:21 / /proc rw - proc proc rw\n"
                 "27 1 254:0 / / rw - ext4 /dev/vda rw\n"
                 "30 27 254:0 /srv /mnt/with\\040space rw - ext4 /dev/vda rw\n")
    assert inotify.mount_points(mountinfo, os.makedev(254, 0)) == ["/", "/mnt/with space"]
    assert inotify.mount_points(mountinfo, os.makedev(8, 1)) == []
    info = info_of(HEAD, "anon_inode:inotify")
    m = inotify.Mark(wd=2, ino=9, dev=os.makedev(8, 1), mask=0x100, handle_type=1, handle=b"")
    assert inotify.refuse(info, inotify.Found(((m, "/x"),), 0), None) is None
    queued = inotify.refuse(info, inotify.Found(((m, "/x"),), 32), None)
    assert queued is not None and "32 bytes of inotify events are queued" in queued
    lost = inotify.refuse(info, inotify.Found(((m, None),), 0), None)
    assert lost is not None and "watch 2 is on inode 9 of device 8:1" in lost


def anon_files() -> pb.ProcessEntry:
    entry = process()
    ep = entry.files.add(id=2, type=pb.OpenFile.EPOLL, path="anon_inode:[eventpoll]")
    ep.epoll.watches.add(tfd=3, events=0x19, data=1 << 63)
    entry.files.add(id=3, type=pb.OpenFile.TIMERFD).timerfd.clockid = 7
    ino = entry.files.add(id=4, type=pb.OpenFile.INOTIFY)
    ino.inotify.watches.add(wd=1, mask=0x100, path="/tmp")
    ino.inotify.watches.add(wd=3, mask=0x100, path="/")
    for fd, file_id in ((2, 2), (3, 3), (4, 4)):  # the epoll set watches fd 3, the timerfd
        entry.fds.add(fd=fd, file_id=file_id)
    return entry


@pytest.mark.parametrize(("change", "field"), [
    (lambda e: setattr(e.files[1].epoll.watches[0], "tfd", -1), "files[1].epoll.watches[0].tfd"),
    (lambda e: setattr(e.files[2].timerfd, "clockid", 2), "files[2].timerfd.clockid"),
    (lambda e: setattr(e.files[2].timerfd, "settime_flags", 4),
     "files[2].timerfd.settime_flags"),
    (lambda e: setattr(e.files[3].inotify.watches[1], "path", "tmp"),
     "files[3].inotify.watches[1].path"),
    (lambda e: setattr(e.files[3].inotify.watches[1], "wd", 0),
     "files[3].inotify.watches[1].wd"),
    (lambda e: setattr(e.files[3].inotify.watches[1], "wd", 1),
     "files[3].inotify.watches.wd[1]"),
])
def test_anon_fd_fields_are_validated(change: object, field: str) -> None:
    entry = anon_files()
    assert list(problems(entry)) == []
    change(entry)  # type: ignore[operator]
    with pytest.raises(ImageError, match=rf"\({re.escape(field)} = "):
        validate("core-42.img", entry)


# --------------------------------------------------------------------------- live


def dump_restore(harness: Harness, target: Asker, incremental: bool) -> None:
    """Dump (plain, or predump + dump --incremental) and restore ``target``."""
    if incremental:
        ck = harness.images("ck")
        assert_ckpt_ok(run_ckpt("predump", "-t", str(target.proc.pid), "-D", ck / "1"))
        harness.dump_and_reap(target.proc, ck / "2", "--incremental", "--prev-images-dir",
                              "../1")
        harness.restore_detached(ck / "2")
    else:
        images = harness.images()
        harness.dump_and_reap(target.proc, images)
        harness.restore_detached(images)


@needs_root
@pytest.mark.parametrize("incremental", [False, True], ids=["dump", "incremental"])
def test_epoll_set_reports_the_same_events(harness: Harness, incremental: bool) -> None:
    target = Asker(harness, "fd_anon.py", "epoll")
    before = target.ask()
    r, b = ["0x1111222233334444", "0x1"], ["0x30", "0x1"]  # eventfd R, nested epoll B
    assert isinstance(before, dict)
    wakeup = before["a"][4][1]  # EPOLLIN|EPOLLERR|EPOLLHUP|EPOLLEXCLUSIVE [|EPOLLWAKEUP]
    assert wakeup in ("10000019", "30000019")
    assert before == {"ready": [r, b], "written": [["0x10", "0x1"], r, b],
                      "armed": [r, ["0x20", "0x1"], b], "after": [r, b],
                      "et_quiet": [], "et_edge": [["0x40", "0x1"]],
                      # every registration with its flags (EPOLLWAKEUP needs CONFIG_PM_SLEEP
                      # and CAP_BLOCK_SUSPEND; without them the kernel drops it, at restore too)
                      "a": [["0x10", "19"], [r[0], "19"], ["0x20", "40000000"], ["0x30", "19"],
                            ["0x50", wakeup]],
                      "c": [["0x40", "80000019"]]}
    dump_restore(harness, target, incremental)
    assert target.ask() == before
    assert target.ask() == before


@needs_root
@pytest.mark.parametrize(("mode", "ready", "says"), [
    ("epoll-closed", [["0x5", "0x1"]], "it watches fd 4, which was closed since"),
    ("epoll-unready", [], "its EPOLLONESHOT registration of fd 4 fired and was not armed "
     "again, and fd 4 is ready for no event now"),
])
def test_epoll_registrations_a_restore_cannot_make_are_refused(
        harness: Harness, mode: str, ready: list[list[str]], says: str) -> None:
    target = Asker(harness, "fd_anon.py", mode)
    assert target.ask() == {"ready": ready}
    for action in ("dump", "predump"):
        images = harness.images(action)
        line = assert_one_error_line(run_ckpt(action, "-t", str(target.proc.pid), "-D", images))
        assert "fd 3 is an anon inode (anon_inode:[eventpoll])" in line and says in line, line
        assert not os.listdir(images)
    assert_running_untraced(target.proc.pid)
    assert target.ask() == {"ready": ready}


@needs_root
@pytest.mark.parametrize("incremental", [False, True], ids=["dump", "incremental"])
def test_timerfds_keep_expiry_period_and_clock(harness: Harness, incremental: bool) -> None:
    target = Asker(harness, "fd_anon.py", "timerfd")
    want = {"expired": 1, "periodic": True, "interval": "(0, 50000000)", "wall_flags": "03",
            "wall_clock": "0", "wall_in_an_hour": True}
    assert target.ask() == want  # the check left an expiry unread again
    dump_restore(harness, target, incremental)
    assert target.ask() == want
    assert target.ask() == want


@needs_root
@pytest.mark.parametrize("incremental", [False, True], ids=["dump", "incremental"])
def test_signalfd_reads_signals_sent_after_restore(harness: Harness, incremental: bool) -> None:
    target = Asker(harness, "fd_anon.py", "signalfd")
    os.kill(target.proc.pid, signal.SIGUSR2)
    assert target.ask() == {"signals": [signal.SIGUSR2], "sigmask": "0000000000000a00"}
    os.kill(target.proc.pid, signal.SIGUSR1)  # pending at the dump
    dump_restore(harness, target, incremental)
    pid = target.proc.pid
    assert target.ask() == {"signals": [signal.SIGUSR1], "sigmask": "0000000000000a00"}
    os.kill(pid, signal.SIGUSR2)
    assert target.ask() == {"signals": [signal.SIGUSR2], "sigmask": "0000000000000a00"}


@needs_root
@pytest.mark.parametrize("incremental", [False, True], ids=["dump", "incremental"])
def test_inotify_watches_keep_their_wds(harness: Harness, tmp_path: Path,
                                        incremental: bool) -> None:
    target = Asker(harness, "fd_anon.py", "inotify", str(tmp_path / "w"))
    want = {"events": [[1, 0x100, "new"], [3, 0x100, "new"]]}
    assert target.ask() == want
    dump_restore(harness, target, incremental)
    assert target.ask() == want
    assert target.ask() == want


@needs_root
def test_queued_inotify_events_are_refused(harness: Harness, tmp_path: Path) -> None:
    where = tmp_path / "w"
    target = Asker(harness, "fd_anon.py", "inotify", str(where))
    (where / "unread").touch()
    line = assert_one_error_line(run_ckpt("dump", "-t", str(target.proc.pid), "-D",
                                          harness.images()))
    assert "anon_inode:inotify" in line and "bytes of inotify events are queued" in line, line
    assert_running_untraced(target.proc.pid)
    assert target.ask() == {"events": [[1, 0x100, "new"], [3, 0x100, "new"],
                                       [3, 0x100, "unread"]]}



@needs_root
def test_a_watched_directory_replaced_since_the_dump_fails_the_restore(
        harness: Harness, tmp_path: Path) -> None:
    where = tmp_path / "w"
    target = Asker(harness, "fd_anon.py", "inotify", str(where))
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    (where / "a").rename(where / "old")
    (where / "a").mkdir()
    res = run_ckpt("restore", "-D", images, "--restore-detached")
    line = assert_one_error_line(res)
    assert f"inotify watch 1: {where / 'a'} is another file than at the dump" in line, line


@needs_root
@pytest.mark.parametrize("hidden", [False, True], ids=["readable", "hidden"])
def test_inotify_watches_are_added_as_the_process(harness: Harness, open_dir: Path,
                                                   hidden: bool) -> None:
    """A uid 65534 process watches its own directories; after the dump one of them is made
    unreadable to it: root could watch it still, the process itself could not."""
    where = open_dir / "w"
    where.mkdir()
    os.chown(where, 65534, 65534)
    target = Asker(harness, "fd_anon.py", "inotify", str(where), nobody_in=open_dir)
    want = {"events": [[1, 0x100, "new"], [3, 0x100, "new"]]}
    assert target.ask() == want
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    if hidden:
        os.chmod(where / "a", 0)
        line = assert_one_error_line(run_ckpt("restore", "-D", images, "--restore-detached",
                                              "--pidfile", harness.new_pidfile()))
        assert f"inotify watch 1: uid 65534 may not read {where / 'a'}" in line, line
    else:
        harness.restore_detached(images)
        assert target.ask() == want


def test_unknown_fdinfo_is_refused_not_a_crash() -> None:
    with pytest.raises(NotDumpable, match="unexpected epoll fdinfo line"):
        epoll.parse(info_of(HEAD + "tfd: what\n", "anon_inode:[eventpoll]"))
    with pytest.raises(NotDumpable, match="unexpected timerfd fdinfo"):
        timerfd.parse(info_of(HEAD + "clockid: 1\n", "anon_inode:[timerfd]").extra)
    with pytest.raises(NotDumpable, match="unexpected inotify fdinfo line"):
        inotify.parse(info_of(HEAD + "inotify wd:1 ino:zz\n", "anon_inode:inotify"))
