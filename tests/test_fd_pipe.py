"""Pipes and FIFOs come back with their bytes, size and flags; a pipe leading outside the
dump is taken from --inherit-fd (ckpt/collect/fdkinds/pipe.py)."""

from __future__ import annotations

import os
import re
import select
import stat
from pathlib import Path

import pytest
from conftest import (
    Asker,
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    is_alive,
    run_ckpt,
)
from test_migrate import start_server

from ckpt.collect.fdkinds.base import FdFlags
from ckpt.collect.fdkinds.pipe import refuse, state_of
from ckpt.collect.fds import FdInfo
from ckpt.errors import ImageError, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.validate import validate
from ckpt.restore.files import check_inherit, parse_inherit_fd, parse_inherit_fds

PIPE_DEV = 14


def end(fd: int, ino: int, flags: int, target: str = "") -> FdInfo:
    return FdInfo(fd=fd, target=target or f"pipe:[{ino}]", pos=0, flags=flags, mnt_id=15,
                  ino=ino, st_mode=stat.S_IFIFO | 0o600, st_dev=PIPE_DEV, st_ino=ino,
                  st_rdev=0, st_size=0)


# --------------------------------------------------------------------------- decisions


def test_both_ends_in_the_process_make_an_internal_pipe_carried_by_its_lowest_reader(
        ) -> None:
    fds = [end(3, 7, os.O_WRONLY), end(5, 7, os.O_RDONLY), end(6, 7, os.O_RDONLY),
           end(4, 8, os.O_RDONLY | os.O_DIRECT)]
    s = state_of(fds[1], fds)
    assert (s.external, s.saved, s.carrier, s.packet) == (False, True, True, False)
    assert not state_of(fds[0], fds).carrier and not state_of(fds[2], fds).carrier
    lone = state_of(fds[3], fds)
    assert lone.external and not lone.saved and lone.packet


def test_one_end_alone_is_external_even_if_nobody_else_holds_it() -> None:
    w = end(1, 9, os.O_WRONLY)
    assert state_of(w, [w]).external
    r = end(0, 9, os.O_RDONLY)
    assert state_of(r, [r]).external and not state_of(r, [r]).saved
    rw = end(3, 9, os.O_RDWR)  # an O_RDWR reopen holds both ends
    assert not state_of(rw, [rw]).external and state_of(rw, [rw]).saved


def test_a_fifo_is_reopened_by_path_and_saved_unless_held_outside() -> None:
    r = end(3, 50, os.O_RDONLY, "/tmp/f")
    s = state_of(r, [r])
    assert s.fifo and not s.external and s.saved
    assert not state_of(r, [r], outside=(99,)).saved


def test_what_a_pipe_refuses() -> None:
    r, w = end(3, 7, os.O_RDONLY), end(4, 7, os.O_WRONLY)
    both = state_of(r, [r, w])
    assert refuse(r, both, FdFlags()) is None
    shared = state_of(r, [r, w], outside=(1234, 1240))
    assert "also held by process 1234, 1240 outside the dump" in (
        refuse(r, shared, FdFlags()) or "")
    lone = state_of(w, [w])
    assert refuse(w, lone, FdFlags()) is None
    assert "its other end is outside the process" in (
        refuse(w, lone, FdFlags(externals=False)) or "")
    fifo = end(5, 60, os.O_RDONLY, "/tmp/f")
    assert "held outside" not in (refuse(fifo, state_of(fifo, [fifo], (8,)), FdFlags()) or "")
    assert "process 8 holds it outside" in (
        refuse(fifo, state_of(fifo, [fifo], (8,)), FdFlags(externals=False)) or "")
    gone = end(5, 60, os.O_RDONLY, "/tmp/f (deleted)")
    assert "a FIFO that was deleted" in (refuse(gone, state_of(gone, [gone]), FdFlags()) or "")


def test_parse_inherit_fd() -> None:
    assert parse_inherit_fd("fd[7]:pipe:[1234]") == ("pipe:[1234]", 7)
    for bad in ("7:pipe:[1]", "fd[x]:pipe:[1]", "fd[3]"):
        with pytest.raises(RestoreError, match="not fd\\[N\\]:OBJECT"):
            parse_inherit_fd(bad)
    assert parse_inherit_fd("fd[1073741815]:pipe:[1]") == ("pipe:[1]", 1073741815)
    for big in ("fd[1073741816]:pipe:[1]", "fd[99999999999999999999]:pipe:[1]",
                "fd[" + "9" * 5000 + "]:pipe:[1]"):
        with pytest.raises(RestoreError, match="out of range"):
            parse_inherit_fd(big)


def test_inherit_fds_name_each_object_once() -> None:
    assert parse_inherit_fds(["fd[3]:pipe:[1]", "fd[4]:pipe:[2]"]) == \
        {"pipe:[1]": 3, "pipe:[2]": 4}
    with pytest.raises(RestoreError, match=r"pipe:\[1\] is given twice \(fd 3 and fd 4\)"):
        parse_inherit_fds(["fd[3]:pipe:[1]", "fd[4]:pipe:[1]"])


@pytest.mark.parametrize(("specs", "words"), [
    (["fd[99999999999999999999]:pipe:[5]"], "out of range"),
    (["fd[3]:pipe:[5]", "fd[3]:pipe:[5]"], "pipe:[5] is given twice"),
])
def test_bad_inherit_fds_are_one_error_line(tmp_path: Path, specs: list[str],
                                             words: str) -> None:
    args = [a for spec in specs for a in ("--inherit-fd", spec)]
    line = assert_one_error_line(run_ckpt("restore", "-D", tmp_path, "--restore-detached", *args))
    assert words in line, line


def test_check_inherit_names_the_fd_the_object_and_the_flag() -> None:
    entry = pb.ProcessEntry(pid=5)
    entry.files.add(id=1, type=pb.OpenFile.PIPE, flags=os.O_WRONLY, object=77,
                    external="pipe:[77]")
    entry.fds.add(fd=1, file_id=1)
    entry.fds.add(fd=2, file_id=1)
    modes = {3: os.O_WRONLY, 4: os.O_RDONLY}

    def getfl(fd: int) -> int:
        if fd not in modes:
            raise OSError(9, "EBADF")
        return modes[fd]

    with pytest.raises(RestoreError, match=r"^fd 1, 2: pipe:\[77\] is external .*"
                       r"--inherit-fd fd\[N\]:pipe:\[77\]"):
        check_inherit(entry, {}, getfl)
    check_inherit(entry, {"pipe:[77]": 3}, getfl)
    with pytest.raises(RestoreError, match="fd 4 is not open for writing"):
        check_inherit(entry, {"pipe:[77]": 4}, getfl)
    with pytest.raises(RestoreError, match="ckpt has no fd 5"):
        check_inherit(entry, {"pipe:[77]": 5}, getfl)
    with pytest.raises(RestoreError, match=r"fd\[3\]:pipe:\[78\]: the images hold no such"):
        check_inherit(entry, {"pipe:[77]": 3, "pipe:[78]": 3}, getfl)


@pytest.mark.parametrize(("pipe", "field"), [
    (pb.PipeFile(size=4096, data=b"x" * 4097), "pipe.size = 4096: less than the 4097 bytes"),
    (pb.PipeFile(size=(1 << 31) + 1), "pipe.size = 2147483649: not in"),
    (pb.PipeFile(size=8192, packets=[b"x" * 4097]), "pipe.packets[0] = "),
    (pb.PipeFile(size=8192, packets=[b"x"], data=b"y"), "pipe.data = 1: bytes besides"),
    (pb.PipeFile(fifo=True), "path = 'fifo': not an absolute path"),
])
def test_a_corrupt_pipe_image_is_named(pipe: pb.PipeFile, field: str) -> None:
    f = pb.OpenFile(id=1, type=pb.OpenFile.PIPE, path="fifo", pipe=pipe)
    with pytest.raises(ImageError, match=re.escape(f"core-1.img: corrupted ({field}")):
        validate("core-1.img", f)
    validate("core-1.img", pb.OpenFile(id=1, type=pb.OpenFile.PIPE, path="pipe:[3]",
                                       pipe=pb.PipeFile(size=4096, data=b"x" * 4096)))


# --------------------------------------------------------------------------- live


CLOEXEC = ["cloexec"]  # os.open's default (os.pipe2's is none)


def peeked(mode: str, queued: int, size: int = 65536, more: str = "-",
           flags: tuple[list[str], list[str]] = ([], [])) -> dict[str, object]:
    """What the target sees; ``flags`` of its read end and its write end."""
    return {"queued": queued, "size": size, "more": more, "flags": list(flags)}


# mode -> (what the first two checks see but the digest, what the third drains)
CASES: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "full": (peeked("full", 65536, more="EAGAIN", flags=([], ["nonblock"])),
             {"read": 65536, "in_order": True, "left": 0}),
    "big": (peeked("big", 300000, size=1 << 20), {"read": 300000, "in_order": True, "left": 0}),
    "nonblock": (peeked("nonblock", 1000, flags=(["nonblock"], CLOEXEC)),
                 {"read": 1000, "in_order": True, "left": 0}),
    "packet": (peeked("packet", 1110, flags=([], ["direct"])),
               {"packets": [10, 100, 1000], "left": 0}),
    "writer": (peeked("writer", 65536), {"read": 200000, "in_order": True, "left": 0}),
    "rdwr": (peeked("rdwr", 5000, flags=(CLOEXEC, CLOEXEC)),
             {"read": 5000, "in_order": True, "left": 0}),
    "fifo": (peeked("fifo", 5000, flags=(CLOEXEC, CLOEXEC)),
             {"read": 5000, "in_order": True, "left": 0}),
}


def without_digest(answer: object) -> object:
    assert isinstance(answer, dict)
    return {k: v for k, v in answer.items() if k != "digest"}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_pipe_bytes_size_and_flags_survive(harness: Harness, mode: str) -> None:
    """The target looks at its pipe (without consuming it) before the dump and after the
    restore, then drains it: every byte is there once, in order; a writer blocked on the
    full pipe goes on writing."""
    seen, drained = CASES[mode]
    target = Asker(harness, "fd_pipe.py", mode, str(harness.tmp / "fifo"))
    before = target.ask()
    assert without_digest(before) == seen
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    if mode == "fifo":  # nothing holds the FIFO now: its bytes are gone but in the image
        fd = os.open(harness.tmp / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        assert os.read(fd, 10) == b""
        os.close(fd)
    harness.restore_detached(images)
    assert target.ask() == before
    assert target.ask() == drained


def test_predump_then_incremental_dump_keeps_the_bytes(harness: Harness) -> None:
    seen, drained = CASES["writer"]
    target = Asker(harness, "fd_pipe.py", "writer")
    before = target.ask()
    assert without_digest(before) == seen
    assert_ckpt_ok(run_ckpt("predump", "-t", str(target.proc.pid), "-D", harness.images("1")))
    harness.dump_and_reap(target.proc, harness.images("2"), "--incremental",
                          "--prev-images-dir", "../1")
    harness.restore_detached(harness.images("2"))
    assert target.ask() == before
    assert target.ask() == drained


def read_some(fd: int) -> bytes:
    """What pipe ``fd`` holds now, waiting for something to arrive or for EOF."""
    ready, _, _ = select.select([fd], [], [], 10)
    assert ready, "nothing arrived in the pipe"
    return os.read(fd, 4096)


def test_an_external_pipe_is_taken_from_inherit_fd(harness: Harness) -> None:
    """The target's stdout-like pipe leads to the test. Without --inherit-fd the restore
    stops before building anything, naming the fd, the pipe and the flag; with it the
    restored target writes into the pipe it is given. What it wrote before the dump and
    nobody read stays in the old pipe, once: it is the outside's."""
    r, w = os.pipe()
    try:
        target = Asker(harness, "fd_pipe.py", "external", str(w), pass_fds=(w,))
    finally:
        os.close(w)
    assert target.ask() == {"wrote": 1}
    assert read_some(r) == b"line 1\n"
    assert target.ask() == {"wrote": 2}  # left in the pipe
    name = f"pipe:[{os.fstat(r).st_ino}]"
    images = harness.images()
    res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", images, reap=target.proc)
    assert_ckpt_ok(res)
    assert f"fd {w} leads outside the dump ({name}): restore it with --inherit-fd " \
        f"fd[N]:{name}" in res.stderr, res.describe()
    target.proc.wait(timeout=10)

    line = assert_one_error_line(run_ckpt("restore", "-D", images, "--restore-detached"))
    assert f"fd {w}: {name} is external" in line and f"--inherit-fd fd[N]:{name}" in line, line
    assert not is_alive(target.proc.pid)
    line = assert_one_error_line(run_ckpt("restore", "-D", images, "--inherit-fd", name))
    assert f"--inherit-fd {name}: not fd[N]:OBJECT" in line, line
    assert read_some(r) == b"line 2\n" and read_some(r) == b""  # then EOF: no writer left

    r2, w2 = os.pipe()
    try:
        harness.restore_detached(images, f"--inherit-fd=fd[{w2}]:{name}", pass_fds=(w2,))
    finally:
        os.close(w2)
    assert target.ask() == {"wrote": 3}
    assert read_some(r2) == b"line 3\n"
    os.close(r)
    os.close(r2)


def migrate_to(harness: Harness) -> tuple[str, ...]:
    """The arguments of a `ckpt migrate` to a page server on a thread of this process."""
    token = harness.tmp / "token"
    token.write_text("migrate-me\n")
    address = f"127.0.0.1:{start_server(harness.tmp / 'dest')}"
    return "--to", address, "--auth-token-file", str(token)


def test_migrate_refuses_an_external_pipe(harness: Harness) -> None:
    """An external pipe cannot be connected on the destination: migrate refuses it before
    the first round, naming it, and the target runs on."""
    r, w = os.pipe()
    try:
        target = Asker(harness, "fd_pipe.py", "external", str(w), pass_fds=(w,))
    finally:
        os.close(w)
    line = assert_one_error_line(run_ckpt("migrate", "-t", str(target.proc.pid),
                                          *migrate_to(harness)))
    assert f"fd {w} is a pipe (pipe:[{os.fstat(r).st_ino}]): its other end is outside" in line
    assert_running_untraced(target.proc.pid)
    assert target.ask() == {"wrote": 1}
    assert read_some(r) == b"line 1\n"
    os.close(r)


def test_migrate_carries_a_full_pipe(harness: Harness) -> None:
    seen, drained = CASES["full"]
    target = Asker(harness, "fd_pipe.py", "full")
    before = target.ask()
    assert without_digest(before) == seen
    res = run_ckpt("migrate", "-t", str(target.proc.pid), *migrate_to(harness),
                   reap=target.proc)
    assert_ckpt_ok(res)
    harness.track(int(re.search(r"as pid (\d+)", res.stdout)[1]))  # type: ignore[index]
    assert target.ask() == before
    assert target.ask() == drained


def test_a_pipe_also_held_outside_is_refused_before_the_freeze(harness: Harness) -> None:
    """Both ends in the target, but the test holds them too: a new pipe at restore would
    cut the test off, so dump and predump refuse it, naming the holder; the target runs
    on untouched."""
    r, w = os.pipe()
    target = Asker(harness, "fd_pipe.py", "external", str(w), pass_fds=(r, w))
    for action in ("dump", "predump"):
        images = harness.images(action)
        line = assert_one_error_line(run_ckpt(action, "-t", str(target.proc.pid), "-D", images))
        assert (f"fd {min(r, w)} is a pipe (pipe:[{os.fstat(r).st_ino}]): a pipe with both "
                f"ends in the process, also held by process {os.getpid()} outside") in line
        assert not (images / "inventory.img").exists()
        assert_running_untraced(target.proc.pid)
    assert target.ask() == {"wrote": 1}
    assert read_some(r) == b"line 1\n"
    os.close(r)
    os.close(w)


def test_a_fifo_held_outside_keeps_its_bytes_there(harness: Harness) -> None:
    """The test holds the target's FIFO open too: the dump leaves its bytes in it (the
    test keeps the pipe alive), the restore reopens the path and finds them, once."""
    seen, drained = CASES["fifo"]
    path = harness.tmp / "fifo"
    target = Asker(harness, "fd_pipe.py", "fifo", str(path))
    held = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        before = target.ask()
        assert without_digest(before) == seen
        images = harness.images()
        harness.dump_and_reap(target.proc, images)
        harness.restore_detached(images)
        assert target.ask() == before  # 5000 bytes, not 10000
        assert target.ask() == drained
    finally:
        os.close(held)
