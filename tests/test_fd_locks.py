"""File locks and leases come back held, before the restored process runs
(ckpt/collect/fdkinds/locks.py): another process still finds them taken."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest
from conftest import (
    Asker,
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    our_children,
    run_ckpt,
    wait_for,
)

from ckpt.collect.fdkinds.locks import (
    collect_locks,
    describe_lock,
    lease_refusal,
    parse_lock,
    refusal,
    restore_locks,
)
from ckpt.collect.fds import FdInfo
from ckpt.collect.restorable import fd_refusal
from ckpt.errors import ImageError, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.validate import validate
from ckpt.kernel.creds import FsIdentity

F_OFD_GETLK = 36
ROOT_ID = FsIdentity(0, 0, (), (1 << 41) - 1)
NOBODY_ID = FsIdentity(65534, 65534, (), 0)
CAP_LEASE = 1 << 28
FLOCK = struct.Struct("hhqqi4x")


def fd_with(*locks: str, target: str = "/srv/data", mode: int = 0o100644) -> FdInfo:
    return FdInfo(fd=5, target=target, pos=0, flags=0o2, mnt_id=30, ino=1311, st_mode=mode,
                  st_dev=0xFE00, st_ino=1311, st_rdev=0, st_size=200,
                  extra=tuple(("lock", f"{n}: {line}") for n, line in enumerate(locks, 1)))


# --------------------------------------------------------------------------- pure


def test_parse_lock_lines_of_every_kind() -> None:
    info = fd_with("FLOCK  ADVISORY  WRITE 1234 fe:00:1311 0 EOF",
                   "POSIX  ADVISORY  READ 1234 fe:00:1311 50 59",
                   "OFDLCK ADVISORY  WRITE -1 fe:00:1311 20 EOF",
                   "LEASE  ACTIVE    READ 1234 fe:00:1311 0 EOF")
    assert refusal(info, reopened=True) is None
    W, R = pb.FileLock.WRITE, pb.FileLock.READ
    assert collect_locks(info) == [
        pb.FileLock(kind=pb.FileLock.FLOCK, type=W),
        pb.FileLock(kind=pb.FileLock.POSIX, type=R, start=50, length=10),
        pb.FileLock(kind=pb.FileLock.OFD, type=W, start=20, length=0),
        pb.FileLock(kind=pb.FileLock.LEASE, type=R)]
    assert [describe_lock(lock) for lock in collect_locks(info)] == [
        "the flock WRITE lock", "the POSIX READ lock on bytes 50-59",
        "the OFD WRITE lock on bytes 20-EOF", "the READ lease"]
    assert parse_lock("1: -> POSIX  ADVISORY  WRITE 99 fe:00:1311 0 EOF") is None


@pytest.mark.parametrize(("line", "says"), [
    ("POSIX  MANDATORY WRITE 1234 fe:00:1311 0 EOF", "holds a mandatory lock"),
    ("LEASE  BREAKING  READ 1234 fe:00:1311 0 EOF", "holds a lease being broken"),
    ("LEASE  BREAKER   READ 1234 fe:00:1311 0 EOF", "holds a lease being broken"),
    ("DELEG  ACTIVE    READ 1234 fe:00:1311 0 EOF", "holds a delegation"),
    ("ACCESS ADVISORY  WRITE 1234 fe:00:1311 0 EOF", "holds a lock of kind ACCESS"),
    ("UNKNOWN UNKNOWN  WRITE 1234 fe:00:1311 0 EOF", "a lock of kind UNKNOWN"),
    ("LEASE  ACTIVE    UNLCK 1234 fe:00:1311 0 EOF", "of type UNLCK"),
    ("-> FLOCK  ADVISORY  WRITE 1234 fe:00:1311 0 EOF", "does not understand"),
])
def test_locks_a_restore_cannot_take_again_are_refused(line: str, says: str) -> None:
    why = fd_refusal(fd_with("FLOCK  ADVISORY  READ 1234 fe:00:1311 0 EOF", line), False)
    assert why is not None and why.startswith("fd 5 is a regular file (/srv/data): ")
    assert says in why


def test_a_lock_on_a_file_not_reopened_by_path_is_refused() -> None:
    tty = fd_with("FLOCK  ADVISORY  WRITE 1234 00:18:3 0 EOF", target="/dev/pts/3",
                  mode=0o20620)
    tty = FdInfo(**{**tty.__dict__, "fd": 0, "st_rdev": os.makedev(136, 3)})
    why = fd_refusal(tty, shell_job=True)
    assert why is not None and why.endswith(
        ": holds a FLOCK lock on a file a restore does not reopen by path, which a restore "
        "cannot take again: not supported yet")
    assert fd_refusal(fd_with("FLOCK  ADVISORY  WRITE 1 fe:00:1311 0 EOF"), False) is None


def test_the_image_range_checks_locks() -> None:
    bad = pb.OpenFile(id=1, path="/f", locks=[pb.FileLock(kind=pb.FileLock.POSIX,
                                                          start=1 << 63)])
    with pytest.raises(ImageError, match=r"locks\[0\]\.start"):
        validate("core-1.img", bad)
    bad.locks[0].start, bad.locks[0].length = 10, (1 << 63) - 10
    with pytest.raises(ImageError, match=r"locks\[0\]\.length .* past the largest"):
        validate("core-1.img", bad)
    bad.locks[0].length = 5
    validate("core-1.img", bad)
    bad.type = pb.OpenFile.INHERITED
    with pytest.raises(ImageError, match=r"locks = 1: on a file a restore does not"):
        validate("core-1.img", bad)


# --------------------------------------------------------------------------- live


def flock_taken(path: Path, op: int = fcntl.LOCK_EX) -> bool:
    """Does another open file hold a flock lock that conflicts with ``op``?"""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def getlk(path: Path, cmd: int, start: int, length: int) -> tuple[int, int, int, int]:
    """(type, start, len, pid) of the lock that blocks a WRITE lock on the range
    (type F_UNLCK: none); asked through an open file of our own."""
    fd = os.open(path, os.O_RDWR)
    try:
        res = fcntl.fcntl(fd, cmd, FLOCK.pack(fcntl.F_WRLCK, 0, start, length, 0))
    finally:
        os.close(fd)
    l_type, _, l_start, l_len, l_pid = FLOCK.unpack(res)
    return l_type, l_start, l_len, l_pid


def assert_held_by(d: Path, pid: int) -> None:
    """Every lock of examples/targets/fd_locks.py, seen from this process."""
    assert flock_taken(d / "flock", fcntl.LOCK_SH)
    assert flock_taken(d / "dir", fcntl.LOCK_SH)
    assert flock_taken(d / "shared", fcntl.LOCK_EX)
    assert not flock_taken(d / "shared", fcntl.LOCK_SH)  # a read lock: shared
    assert getlk(d / "posix", fcntl.F_GETLK, 0, 0) == (fcntl.F_WRLCK, 0, 10, pid)
    assert getlk(d / "posix", fcntl.F_GETLK, 50, 100) == (fcntl.F_RDLCK, 100, 0, pid)
    assert getlk(d / "posix", fcntl.F_GETLK, 10, 90)[0] == fcntl.F_UNLCK
    assert getlk(d / "ofd", F_OFD_GETLK, 0, 0) == (fcntl.F_WRLCK, 20, 5, -1)
    for name, type_ in (("lease", "READ"), ("wlease", "WRITE")):
        ino = os.stat(d / name).st_ino
        leases = [line.split() for line in Path("/proc/locks").read_text().splitlines()
                  if line.split()[1] == "LEASE" and line.split()[5].endswith(f":{ino}")]
        assert [(w[2], w[3], w[4]) for w in leases] == [("ACTIVE", type_, str(pid))]


def start_locker(harness: Harness) -> tuple[Asker, Path, object]:
    d = harness.tmp / "locked"
    d.mkdir()
    target = Asker(harness, "fd_locks.py", str(d))
    before = target.ask()
    assert before == {
        "flock": ["FLOCK ADVISORY WRITE 0 EOF"], "flock-dup": ["FLOCK ADVISORY WRITE 0 EOF"],
        "shared": ["FLOCK ADVISORY READ 0 EOF"], "dir": ["FLOCK ADVISORY WRITE 0 EOF"],
        "posix": ["POSIX ADVISORY WRITE 0 9"],
        "posix-2": ["POSIX ADVISORY READ 100 EOF"], "ofd": ["OFDLCK ADVISORY WRITE 20 24"],
        "lease": ["LEASE ACTIVE READ 0 EOF"], "wlease": ["LEASE ACTIVE WRITE 0 EOF"],
        "lease-type": "READ", "breaks": 0}
    assert_held_by(d, target.proc.pid)
    return target, d, before


@pytest.mark.parametrize("new_pid", [False, True], ids=["same-pid", "new-pid"])
def test_locks_and_lease_are_held_again_before_the_process_runs(harness: Harness,
                                                                new_pid: bool) -> None:
    target, d, before = start_locker(harness)
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    # the gap: the dump killed the target, and its locks went with it
    assert not flock_taken(d / "flock")
    assert getlk(d / "posix", fcntl.F_GETLK, 0, 0)[0] == fcntl.F_UNLCK
    pid = harness.restore_detached(images, *(["--new-pid"] if new_pid else []))
    assert (pid != target.proc.pid) == new_pid
    assert_held_by(d, pid)
    assert target.ask() == before
    # the lease is the restored process's: opening the file for writing breaks it (SIGIO
    # to its owner), the target gives it up, and the open goes through
    os.close(os.open(d / "lease", os.O_WRONLY))
    after = target.ask()
    assert isinstance(after, dict)
    assert (after["lease"], after["lease-type"], after["breaks"]) == ([], "UNLCK", 1)


def test_locks_survive_predump_and_incremental_dump(harness: Harness) -> None:
    target, d, before = start_locker(harness)
    pre = harness.images("pre")
    assert_ckpt_ok(run_ckpt("predump", "-t", str(target.proc.pid), "-D", pre))
    assert_held_by(d, target.proc.pid)  # a predump leaves them alone
    images = harness.images("final")
    harness.dump_and_reap(target.proc, images, "--incremental", "--prev-images-dir", "../pre")
    pid = harness.restore_detached(images)
    assert_held_by(d, pid)
    assert target.ask() == before


def test_a_lock_taken_in_the_gap_fails_the_restore_naming_the_file(harness: Harness) -> None:
    target, d, _ = start_locker(harness)
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    thief = os.open(d / "flock", os.O_RDONLY)
    try:
        fcntl.flock(thief, fcntl.LOCK_SH | fcntl.LOCK_NB)
        res = run_ckpt("restore", "-D", images, "--restore-detached", "--new-pid",
                       "--pidfile", harness.new_pidfile())  # killed at teardown if made
    finally:
        os.close(thief)
    line = assert_one_error_line(res)
    assert f"cannot take the flock WRITE lock on {d / 'flock'} again" in line
    assert "another process holds a conflicting lock" in line
    assert not our_children()  # the half-restored process is gone


def waiting_on(pid: int) -> set[int]:
    """Inodes on which ``pid`` waits for a lock ("->" lines of /proc/locks)."""
    out = set()
    for line in Path("/proc/locks").read_text().splitlines():
        words = line.split()
        if words[1] == "->" and words[5] == str(pid):
            out.add(int(words[6].rsplit(":", 1)[1]))
    return out


def test_a_process_waiting_for_a_lock_waits_again(harness: Harness) -> None:
    d = harness.tmp / "contended"
    d.mkdir()
    for name in ("wait-flock", "wait-posix"):
        (d / name).write_bytes(b"x" * 100)
    inodes = {os.stat(d / name).st_ino for name in ("wait-flock", "wait-posix")}
    held_flock = os.open(d / "wait-flock", os.O_RDWR)
    held_posix = os.open(d / "wait-posix", os.O_RDWR)  # our POSIX lock: keep it open
    try:
        fcntl.flock(held_flock, fcntl.LOCK_EX)
        fcntl.lockf(held_posix, fcntl.LOCK_EX, 10, 0)
        target = Asker(harness, "fd_lock_waiter.py", str(d))
        wait_for(lambda: waiting_on(target.proc.pid) == inodes, 10, "the target to wait")
        assert target.ask() == {"flock": False, "posix": False}
        images = harness.images()
        harness.dump_and_reap(target.proc, images)
        pid = harness.restore_detached(images)
        # the restored threads went back to their calls (-ERESTARTSYS) and wait again
        wait_for(lambda: waiting_on(pid) == inodes, 10, "the restored process to wait")
        assert target.ask() == {"flock": False, "posix": False}
    finally:
        os.close(held_flock)
        os.close(held_posix)
    wait_for(lambda: target.ask() == {"flock": True, "posix": True}, 10, "the locks")


class FakeRemote:
    """Records the injected syscalls; each answers ``result``."""

    pid = 4242

    def __init__(self, result: int = 0) -> None:
        self.result = result
        self.calls: list[tuple[int, ...]] = []
        self.memory = b""

    def sc(self, nr: int, *args: int, what: str = "", check: bool = True) -> int:
        self.calls.append((nr, *args))
        return self.result

    def put(self, data: bytes, off: int = 0) -> int:
        self.memory = data
        return 0x1000 + off

    def put_str(self, s: str, off: int = 0) -> int:
        return self.put(s.encode() + b"\0", off)


def test_restore_takes_each_lock_through_its_files_fd() -> None:
    remote = FakeRemote()
    posix = pb.FileLock(kind=pb.FileLock.POSIX, type=pb.FileLock.WRITE, start=5, length=10)
    lease = pb.FileLock(kind=pb.FileLock.LEASE, type=pb.FileLock.READ, signal=36)
    files = [pb.OpenFile(id=1, path="/a", locks=[posix]),
             pb.OpenFile(id=2, path="/b", locks=[lease]),
             pb.OpenFile(id=3, path="/c", locks=[posix])]  # no fd: not taken
    restore_locks(remote, files, {1: 7, 2: 9}, ROOT_ID, owner=lambda fd: 1000)
    assert remote.calls == [(72, 7, 6, 0x1000), (72, 9, 10, 36), (72, 9, 1024, 0)]
    assert FLOCK.unpack(remote.memory) == (fcntl.F_WRLCK, 0, 5, 10, 0)


@pytest.mark.parametrize(("lock", "says"), [
    (pb.FileLock(kind=pb.FileLock.FLOCK, type=pb.FileLock.READ),
     "fd 7: cannot take the flock READ lock on /a again: another process holds a "
     "conflicting lock"),
    (pb.FileLock(kind=pb.FileLock.LEASE, type=pb.FileLock.WRITE),
     "fd 7: cannot take the WRITE lease on /a again: another process has the file open"),
])
def test_a_lock_taken_meanwhile_is_one_error_naming_the_file(lock: pb.FileLock,
                                                            says: str) -> None:
    with pytest.raises(RestoreError) as exc:
        restore_locks(FakeRemote(-11), [pb.OpenFile(id=1, path="/a", locks=[lock])], {1: 7},
                      ROOT_ID, owner=lambda fd: 0)
    assert str(exc.value) == says


def test_a_lease_needs_the_files_owner_or_cap_lease() -> None:
    assert lease_refusal(NOBODY_ID, 65534) is None  # its own file
    assert lease_refusal(FsIdentity(1000, 1000, (), CAP_LEASE), 0) is None
    assert lease_refusal(ROOT_ID, 1000) is None
    why = lease_refusal(NOBODY_ID, 0)
    assert why is not None and "owned by uid 0 now" in why and "uid 65534" in why, why


def test_a_lease_the_process_may_not_hold_is_not_taken() -> None:
    remote = FakeRemote()
    lease = pb.FileLock(kind=pb.FileLock.LEASE, type=pb.FileLock.WRITE)
    with pytest.raises(RestoreError) as exc:
        restore_locks(remote, [pb.OpenFile(id=1, path="/a", locks=[lease])], {1: 7},
                      NOBODY_ID, owner=lambda fd: 0)
    assert str(exc.value).startswith("fd 7: the WRITE lease on /a: the file is owned by "
                                     "uid 0 now"), exc.value
    assert remote.calls == []


@pytest.mark.parametrize("chowned", [False, True], ids=["same-owner", "chowned"])
def test_a_lease_on_a_file_chowned_since_the_dump_is_refused(harness: Harness, open_dir: Path,
                                                             chowned: bool) -> None:
    """A uid 65534 process leases its own files; after the dump one of them is given to
    root: root's stub could lease it, the process itself could not."""
    d = open_dir / "locked"
    d.mkdir()
    os.chown(d, 65534, 65534)
    target = Asker(harness, "fd_locks.py", str(d), nobody_in=open_dir)
    before = target.ask()
    assert isinstance(before, dict) and before["lease-type"] == "READ", before
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    if chowned:
        os.chown(d / "wlease", 0, 0)
        line = assert_one_error_line(run_ckpt("restore", "-D", images, "--restore-detached",
                                              "--pidfile", harness.new_pidfile()))
        assert f"the WRITE lease on {d / 'wlease'}: the file is owned by uid 0 now" in line
        assert not our_children()
    else:
        harness.restore_detached(images)
        assert target.ask() == before
