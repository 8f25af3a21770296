"""System V shared memory comes back attached where it was, with its contents, mode and
owner (ckpt/collect/sysvshm.py)."""

from __future__ import annotations

import contextlib
import ctypes
import subprocess
from collections.abc import Iterator

import pytest
from conftest import (
    Asker,
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    dump_tree,
    read_lines,
    run_ckpt,
    wait_for,
)

from ckpt.collect.sysvshm import Segment, parse_sysvipc_shm, refusals
from ckpt.collect.vmas import VmaInfo, VmaKind

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
IPC_RMID = 0
SHM_TEXT = """\
       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
      4660         26  1640                 12288 16811 16811      3     0     0     0     0 1796310165          0 1796310165                     0                     0
         0         27   600                  4096 16811 16811      1  1000   100     0     0 1796310165          0 1796310165                     0                     0
"""  # noqa: E501


def segment_exists(shmid: int) -> bool:
    with open("/proc/sysvipc/shm") as f:
        return any(line.split()[1] == str(shmid) for line in f.read().splitlines()[1:])


def vma(start: int, end: int, shmid: int, pgoff: int = 0) -> VmaInfo:
    return VmaInfo(start=start, end=end, prot=3, shared=True, kind=VmaKind.SYSV_SHM,
                   pgoff=pgoff, path="/SYSV00001234 (deleted)", dev=1, inode=shmid,
                   vmflags=("rd", "wr", "sh", "mr", "mw", "me", "ms"))


def test_parse_and_refusals() -> None:
    segs = parse_sysvipc_shm(SHM_TEXT)
    assert segs[26] == Segment(key=4660, shmid=26, mode=0o1640, size=12288, nattch=3,
                               uid=0, gid=0, cuid=0, cgid=0)
    assert segs[27].uid == 1000 and segs[27].gid == 100 and not segs[27].locked
    assert segs[26].removed and not segs[27].removed
    whole = [vma(0x10000, 0x12000, 26), vma(0x12000, 0x13000, 26, pgoff=0x2000)]
    second = [vma(0x20000, 0x23000, 26)]
    assert refusals(5, whole + second, segs, True) == []
    assert "another IPC namespace" in refusals(5, whole, segs, False)[0]
    assert refusals(5, [whole[0], vma(0x12000, 0x13000, 26, pgoff=0x3000)], segs, True)
    assert refusals(5, whole, segs, True) == [
        "process 5's System V shared memory 26 is also attached by 1 process(es) outside "
        "the dump: a restore would cut them off"]
    assert refusals(5, whole, segs, True, members={26: 1}) == []  # a member of its tree
    assert "in part (unmapped inside)" in refusals(5, [whole[0], *second], segs, True)[0]
    assert "does not list" in refusals(5, [vma(0x10000, 0x11000, 99)], segs, True)[0]


def test_removed_private_segment(harness: Harness) -> None:
    target = Asker(harness, "sysv_shm.py", "private", "0")
    before = target.ask()
    assert isinstance(before, dict)
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    pid = harness.restore_detached(images)
    after = target.ask()
    assert after == {**before, "counter": 2}
    assert after["mode"] == "0o1640"  # still removed: gone with the last detach
    harness.kill(pid)
    assert not segment_exists(before["shmid"])


@pytest.mark.parametrize("how", ["dump", "predump+incremental", "segment gone",
                                 "locked, gone"])
def test_keyed_segment(harness: Harness, how: str) -> None:
    key = 0x5EC0000 + (hash(how) & 0xFFFF)
    locked = how.startswith("locked")
    target = Asker(harness, "sysv_shm.py", "locked" if locked else "keyed", str(key))
    before = target.ask()
    assert isinstance(before, dict)
    assert before["mode"] == ("0o2640" if locked else "0o640")
    shmid = before["shmid"]
    try:
        if how == "predump+incremental":
            pre = harness.images("pre")
            assert_ckpt_ok(run_ckpt("predump", "-t", str(target.proc.pid), "-D", pre))
            assert target.ask()["counter"] == 2  # type: ignore[index]
            images = harness.images("final")
            harness.dump_and_reap(target.proc, images, "--incremental", "--prev-images-dir",
                                  "../pre")
        else:
            images = harness.images()
            harness.dump_and_reap(target.proc, images)
        assert segment_exists(shmid)  # not removed: it outlives the process
        if how.endswith("gone"):  # e.g. restored on another host: made again
            assert libc.shmctl(shmid, IPC_RMID, None) == 0
            assert not segment_exists(shmid)
        harness.restore_detached(images)
        after = target.ask()
        counter = 3 if how == "predump+incremental" else 2
        assert after == {**before, "counter": counter}
        assert after["maps"] == ["r--s", "r--s", "rw-s"]  # read-only attach kept
    finally:
        libc.shmctl(shmid, IPC_RMID, None)


def test_shared_with_another_process_is_refused(harness: Harness) -> None:
    target = Asker(harness, "sysv_shm.py", "keyed", str(0x5EC1234))
    state = target.ask()
    assert isinstance(state, dict)
    try:
        with attached_elsewhere(state["shmid"]):
            res = run_ckpt("dump", "-t", str(target.proc.pid), "-D", harness.images())
            line = assert_one_error_line(res)
            assert f"System V shared memory {state['shmid']} is also attached by 1 process" \
                in line
            assert target.ask()["counter"] == 2  # type: ignore[index]
    finally:
        libc.shmctl(state["shmid"], IPC_RMID, None)


@contextlib.contextmanager
def attached_elsewhere(shmid: int) -> Iterator[None]:
    """Another process attaches segment ``shmid`` for the duration of the block."""
    other = subprocess.Popen(["python3", "-c", (
        "import ctypes,sys,time; l=ctypes.CDLL(None); l.shmat.restype=ctypes.c_void_p;"
        f"l.shmat({shmid}, None, 0); print('on', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE)
    try:
        assert other.stdout is not None and other.stdout.readline() == b"on\n"
        yield
    finally:
        other.kill()
        other.wait()
        if other.stdout is not None:
            other.stdout.close()


def test_image_limits_match() -> None:
    from ckpt.collect.sysvshm import MAX_SEGMENT
    from ckpt.images.pb import core_pb2 as pb
    from ckpt.images.validate import problems

    assert not list(problems(pb.SysvShm(shmid=3, mode=0o640, size=MAX_SEGMENT)))
    assert list(problems(pb.SysvShm(shmid=3, mode=0o640, size=MAX_SEGMENT + 1)))


def test_migrate_refuses_before_connecting(harness: Harness) -> None:
    target = Asker(harness, "sysv_shm.py", "private", "0")
    token = harness.tmp / "token"
    token.write_text("x" * 32)
    res = run_ckpt("migrate", "-t", str(target.proc.pid), "--to", "127.0.0.1:9",
                   "--auth-token-file", token)
    line = assert_one_error_line(res)
    assert "attaches System V shared memory" in line and "migrate does not yet" in line
    assert target.ask()["counter"] == 1  # type: ignore[index]


def test_segment_in_use_at_restore_is_not_overwritten(harness: Harness) -> None:
    """The dumped segment outlives the process; if another process attaches it before the
    restore, the restore stops instead of overwriting what that process sees."""
    target = Asker(harness, "sysv_shm.py", "keyed", str(0x5EC2345))
    state = target.ask()
    assert isinstance(state, dict)
    images = harness.images()
    harness.dump_and_reap(target.proc, images)
    try:
        with attached_elsewhere(state["shmid"]):
            res = run_ckpt("restore", "-D", images, "--restore-detached")
            line = assert_one_error_line(res)
            assert f"System V shared memory id {state['shmid']} is taken by another segment " \
                "or in use (attached by 1 process(es))" in line
    finally:
        libc.shmctl(state["shmid"], IPC_RMID, None)


TREE = """
import ctypes, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
shmid = libc.shmget(0, 4096, 0o1600)
at = libc.shmat(shmid, None, 0)
libc.shmctl(shmid, 0, None)  # IPC_RMID: gone with the last detach
def get(i): return struct.unpack("Q", ctypes.string_at(at + 8 * i, 8))[0]
def put(i, v): ctypes.memmove(at + 8 * i, struct.pack("Q", v), 8)
child = os.fork() == 0
me = 1 if child else 0
while True:  # each counts in its own slot and prints the other's
    put(me, get(me) + 1)
    os.write(1, f"{'child' if child else 'parent'} {shmid} {get(1 - me)}\\n".encode())
    time.sleep(0.02)
"""


def test_segment_shared_by_a_tree_is_restored_once_and_shared(harness: Harness) -> None:
    """A removed segment a parent and its child both attach (inherited across fork): the
    tree dump takes it (no process outside attaches it), restore makes it once and both
    attach it: each still sees the other count."""
    out = harness.tmp / "out.txt"
    proc = harness.launch(["python3", "-c", TREE], out)

    def seen(who: str) -> list[int]:
        return [int(line.split()[2]) for line in read_lines(out) if line.startswith(who)]

    wait_for(lambda: (len(seen("parent")) > 3 and len(seen("child")) > 3) or None, 10, "both")
    shmid = int(next(line for line in read_lines(out)).split()[1])
    images = dump_tree(harness, proc, "dump")  # every member reaped
    wait_for(lambda: not segment_exists(shmid) or None, 10, "the segment to go")
    dumped = (max(seen("parent")), max(seen("child")))
    harness.restore_detached(images)
    wait_for(lambda: (max(seen("parent")) > dumped[0] + 5 and max(seen("child")) > dumped[1] + 5)
             or None, 10, "each to see the other count on")
    assert segment_exists(shmid)
