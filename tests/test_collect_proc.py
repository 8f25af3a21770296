"""Tests of ckpt.collect.proc / ckpt.collect.fds on captured trees and on live processes.

The tree under tests/fixtures/proc was captured from a real process by
tests/fixtures/capture_proc.py (see its docstring for what the process had open).
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ckpt.collect import fds as fds_module
from ckpt.collect import proc
from ckpt.collect.fds import (
    O_CLOEXEC,
    FdInfo,
    classify_fd,
    describe_fd,
    group_open_files,
    open_file_groups,
    read_fd,
    read_fds,
)
from ckpt.collect.maps import read_maps, read_smaps, read_smaps_vmflags
from ckpt.collect.proc import (
    PF_KTHREAD,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    RLIM_INFINITY,
    is_kernel_thread,
    list_children,
    list_tasks,
    pid_exists,
    proc_errors,
    read_auxv,
    read_cmdline,
    read_comm,
    read_cwd,
    read_exe,
    read_limits,
    read_stat,
    read_status,
)
from ckpt.errors import AccessDenied, NoSuchProcess

FIX = Path(__file__).parent / "fixtures"
ROOT = str(FIX / "proc")
META: dict[str, Any] = json.loads((FIX / "proc-meta.json").read_text())
PID: int = META["pid"]
FDSTAT: dict[str, list[int]] = json.loads((FIX / "proc-fdstat.json").read_text())


def fixture_stat(path: str) -> os.stat_result:
    """stat() of a fixture fd link, as captured from the live process."""
    mode, dev, ino, rdev, size = FDSTAT[os.path.basename(path)]
    return os.stat_result((mode, ino, dev, 1, 0, 0, size, 0, 0, 0), {"st_rdev": rdev})


# --- fixture tree ---------------------------------------------------------------------


def test_stat_fixture_comm_with_parens_and_field_numbering() -> None:
    st = read_stat(PID, root=ROOT)
    assert st.pid == PID
    assert st.comm == "x) (y z)"
    assert st.state == "S"
    assert st.num_threads == len(META["tids"]) == 2
    assert st.flags & PF_KTHREAD == 0
    assert st.exit_signal == signal.SIGCHLD
    assert st.ppid == read_status(PID, root=ROOT).ppid
    # Field numbering cross-checked against other files of the same process.
    assert st.arg_end - st.arg_start == len(read_cmdline(PID, root=ROOT))
    assert st.start_code < st.end_code <= st.start_data < st.end_data <= st.start_brk
    assert st.arg_end <= st.env_start < st.env_end
    maps = {m.path: m for m in read_maps(PID, root=ROOT)}
    assert maps["[heap]"].start == st.start_brk
    assert maps["[stack]"].start <= st.start_stack < maps["[stack]"].end
    assert maps["[stack]"].start <= st.arg_start < maps["[stack]"].end


def test_status_fixture() -> None:
    s = read_status(PID, root=ROOT)
    assert (s.name, s.state, s.tgid, s.pid) == ("x) (y z)", "S", PID, PID)
    assert s.umask == 0o022
    assert s.uid == (0, 0, 0, 0) and s.gid == (0, 0, 0, 0)
    assert s.threads == 2
    assert s.nspid == (PID,)
    # Python ignores SIGPIPE and SIGXFSZ and catches SIGINT.
    assert s.sigign == (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
    assert s.sigcgt & (1 << (signal.SIGINT - 1))
    assert s.sigblk == 0 and s.sigpnd == 0
    assert s.nonewprivs == 0 and s.seccomp == 0


def test_maps_fixture() -> None:
    maps = read_maps(PID, root=ROOT)
    paths = {m.path for m in maps}
    assert {"", "[heap]", "[stack]", "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"} <= paths
    assert all(a.end <= b.start for a, b in itertools.pairwise(maps))
    (deleted,) = [m for m in maps if m.deleted]
    assert deleted.path == META["tmp"] + "/with space.bin (deleted)"
    assert (deleted.perms, deleted.prot, deleted.shared) == ("r--s", PROT_READ, True)
    assert deleted.size == 8192 and deleted.offset == 0
    assert deleted.inode == FDSTAT["5"][2]
    assert deleted.dev == FDSTAT["5"][1] == os.makedev(0xFE, 0)
    vsys = next(m for m in maps if m.path == "[vsyscall]")
    assert (vsys.start, vsys.prot, vsys.shared) == (0xFFFFFFFFFF600000, PROT_EXEC, False)
    heap = next(m for m in maps if m.path == "[heap]")
    assert heap.prot == PROT_READ | PROT_WRITE and heap.inode == 0 and heap.dev == 0
    text = next(m for m in maps if m.prot & PROT_EXEC and m.inode)
    assert text.offset == 0x1000 and text.path == read_exe(PID, root=ROOT)


def test_smaps_fixture() -> None:
    flags = read_smaps_vmflags(PID, root=ROOT)
    maps = {m.start: m for m in read_maps(PID, root=ROOT)}
    assert len(flags) == 8 and set(flags) <= set(maps)
    by_path = {maps[start].path: f for start, f in flags.items()}
    assert by_path["[stack]"] == ("rd", "wr", "mr", "mw", "me", "gd", "ac")
    assert "ms" in by_path[META["tmp"] + "/with space.bin (deleted)"]
    assert "io" in by_path["[vvar]"]
    smaps = read_smaps(PID, root=ROOT)
    assert {s.start: s.vmflags for s in smaps} == flags
    assert all(s.end == maps[s.start].end for s in smaps)
    heap = next(s for s in smaps if maps[s.start].path == "[heap]")
    assert heap.rss > 0 and heap.rss % 1024 == 0 and heap.anonymous == heap.rss
    assert all(s.swap == 0 for s in smaps)


def test_small_files_fixture() -> None:
    assert read_comm(PID, root=ROOT) == "x) (y z)"
    argv = read_cmdline(PID, root=ROOT).split(b"\0")
    assert argv[1] == b"-c" and argv[-3] == str(META["tmp"]).encode() and argv[-1] == b""
    auxv = read_auxv(PID, root=ROOT)
    pairs = [(int.from_bytes(auxv[i:i + 8], "little"), int.from_bytes(auxv[i + 8:i + 16],
              "little")) for i in range(0, len(auxv), 16)]
    assert pairs[-1] == (0, 0) and (6, 4096) in pairs  # AT_NULL, AT_PAGESZ
    assert read_cwd(PID, root=ROOT) == META["tmp"]
    assert read_exe(PID, root=ROOT).endswith("python3.11")
    assert list_tasks(PID, root=ROOT) == META["tids"]
    # No CONFIG_PROC_CHILDREN here: found by scanning stat files of the tree.
    assert list_children(PID, root=ROOT) == [META["kid"]]


def test_limits_fixture() -> None:
    limits = read_limits(PID, root=ROOT)
    assert [r.resource for r in limits] == list(range(16))
    assert limits[resource.RLIMIT_CPU].soft == RLIM_INFINITY
    assert limits[resource.RLIMIT_STACK].soft == 8 * 1024 * 1024
    assert limits[resource.RLIMIT_NOFILE].hard == 20000
    assert limits[resource.RLIMIT_NICE].soft == 0


def test_kernel_thread_fixture() -> None:
    assert is_kernel_thread(2, root=ROOT)
    assert read_stat(2, root=ROOT).flags & PF_KTHREAD
    assert not is_kernel_thread(PID, root=ROOT)
    assert pid_exists(PID, root=ROOT) and not pid_exists(999999, root=ROOT)
    assert not pid_exists(0, root=ROOT)


def test_fds_fixture() -> None:
    fds = {i.fd: i for i in read_fds(PID, root=ROOT, stat=fixture_stat)}
    assert list(fds) == list(range(10))
    f, second, (r, w), null = META["file"], META["second"], META["pipe"], META["null"]
    data = META["tmp"] + "/data.txt"
    for fd in (1, 2, f, second):
        assert fds[fd].target == data and fds[fd].pos == 6
        assert fds[fd].flags & os.O_ACCMODE == os.O_RDWR
        assert fds[fd].ino == fds[fd].st_ino and fds[fd].st_size == 12
        assert classify_fd(fds[fd]) == "regular"
    assert not fds[1].cloexec and fds[f].cloexec and fds[f].flags & O_CLOEXEC
    assert fds[r].target == fds[w].target and fds[r].target.startswith("pipe:[")
    assert fds[w].flags & os.O_ACCMODE == os.O_WRONLY
    assert classify_fd(fds[r]) == "pipe" and classify_fd(fds[null]) == "dev_null"
    assert fds[5].target.endswith("with space.bin (deleted)")
    assert fds[f].mnt_id > 0


def test_group_open_files_fixture_only_compares_candidates() -> None:
    fds = read_fds(PID, root=ROOT, stat=fixture_stat)
    shared = {1, 2, META["file"]}
    calls: list[tuple[int, int]] = []

    def same(a: int, b: int) -> bool:
        calls.append((a, b))
        return {a, b} <= shared

    groups = group_open_files(fds, same)
    assert [1, 2, META["file"]] in groups
    assert [META["second"]] in groups
    assert sorted(fd for g in groups for fd in g) == list(range(10))
    data_fds = shared | {META["second"]}
    assert calls and all(a in data_fds and b in data_fds for a, b in calls)


# --- pure helpers ---------------------------------------------------------------------


def fdinfo(fd: int, target: str = "/f", mode: int = stat.S_IFREG | 0o644, rdev: int = 0,
           ino: int = 7, pos: int = 0, flags: int = 2) -> FdInfo:
    return FdInfo(fd=fd, target=target, pos=pos, flags=flags, mnt_id=1, ino=ino,
                  st_mode=mode, st_dev=9, st_ino=ino, st_rdev=rdev, st_size=0)


def test_group_open_files_keys_filter_and_order() -> None:
    always: Callable[[int, int], bool] = lambda a, b: True  # noqa: E731
    fds = [fdinfo(7), fdinfo(3, flags=2 | O_CLOEXEC), fdinfo(5, pos=1), fdinfo(4, ino=8)]
    # same_file says yes, but pos and inode differ: never the same open file.
    assert group_open_files(fds, always) == [[3, 7], [4], [5]]
    assert group_open_files(fds, lambda a, b: False) == [[3], [4], [5], [7]]
    assert group_open_files([], always) == []


def test_classify_fd_kinds() -> None:
    chr_ = stat.S_IFCHR | 0o620
    assert classify_fd(fdinfo(1, "/dev/pts/3", chr_, os.makedev(136, 3))) == "tty"
    assert classify_fd(fdinfo(1, "/dev/tty", chr_, os.makedev(5, 0))) == "tty"
    assert classify_fd(fdinfo(1, "/dev/zero", chr_, os.makedev(1, 5))) == "chardev"
    assert classify_fd(fdinfo(1, "/dev/null", chr_, os.makedev(1, 3))) == "dev_null"
    assert classify_fd(fdinfo(1, "/", stat.S_IFDIR | 0o755)) == "directory"
    assert classify_fd(fdinfo(1, "/dev/sda", stat.S_IFBLK | 0o660)) == "other"
    assert classify_fd(fdinfo(1, "anon_inode:[eventfd]", 0o600)) == "anon_inode"
    sock = fdinfo(5, "socket:[1234]", stat.S_IFSOCK | 0o777)
    assert classify_fd(sock) == "socket"
    assert describe_fd(sock) == "fd 5 is a socket (socket:[1234])"
    assert describe_fd(fdinfo(3, "anon_inode:[eventfd]", 0o600)).startswith(
        "fd 3 is an anon inode (")
    assert describe_fd(fdinfo(4, "/tmp/x (deleted)")) == \
        "fd 4 is a regular file (/tmp/x (deleted))"
    assert describe_fd(fdinfo(6, "/dev/sda", stat.S_IFBLK | 0o660)) == \
        "fd 6 is a special file (/dev/sda)"


# --- errors and degenerate files ------------------------------------------------------


READERS: list[Callable[..., object]] = [
    read_maps, read_smaps_vmflags, read_smaps, read_stat, read_status, read_auxv, read_exe,
    read_cwd, read_comm, read_cmdline, list_tasks, list_children, read_limits,
    is_kernel_thread, read_fds,
]


@pytest.mark.parametrize("reader", READERS, ids=lambda f: f.__name__)
def test_missing_process_raises_no_such_process(reader: Callable[..., object],
                                                tmp_path: Path) -> None:
    with pytest.raises(NoSuchProcess) as exc:
        reader(4242, root=str(tmp_path))
    assert exc.value.pid == 4242


def test_dead_live_process_raises_no_such_process() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(NoSuchProcess):
        read_stat(child.pid)
    with pytest.raises(NoSuchProcess):
        read_fds(child.pid)
    assert not pid_exists(child.pid)


def test_proc_errors_mapping() -> None:
    with pytest.raises(AccessDenied, match="fd 3"), proc_errors(7, "fd 3"):
        raise PermissionError(13, "denied")
    with pytest.raises(NoSuchProcess), proc_errors(7, "stat"):
        raise ProcessLookupError(3, "gone")
    with pytest.raises(NoSuchProcess), proc_errors(7, "stat"):
        raise FileNotFoundError(2, "gone")
    with pytest.raises(IsADirectoryError), proc_errors(7, "stat"):
        raise IsADirectoryError(21, "other errors pass through")


def test_empty_files(tmp_path: Path) -> None:
    d = tmp_path / "9"
    (d / "task" / "9").mkdir(parents=True)
    for name in ("maps", "smaps", "cmdline", "auxv", "comm", "limits", "stat", "status",
                 "task/9/children"):
        (d / name).write_bytes(b"")
    root = str(tmp_path)
    assert read_maps(9, root=root) == []
    assert read_smaps_vmflags(9, root=root) == {} and read_smaps(9, root=root) == []
    assert read_cmdline(9, root=root) == b"" and read_auxv(9, root=root) == b""
    assert read_comm(9, root=root) == "" and read_limits(9, root=root) == []
    assert list_children(9, root=root) == []
    with pytest.raises(NoSuchProcess, match="empty stat"):
        read_stat(9, root=root)
    with pytest.raises(NoSuchProcess, match="empty status"):
        read_status(9, root=root)
    assert not pid_exists(9, root=root)


def test_children_files_are_used_when_present(tmp_path: Path) -> None:
    for tid, kids in ((9, "12 5 "), (10, "7 ")):
        (tmp_path / "9" / "task" / str(tid)).mkdir(parents=True)
        (tmp_path / "9" / "task" / str(tid) / "children").write_text(kids)
    assert list_children(9, root=str(tmp_path)) == [5, 7, 12]


# --- live processes -------------------------------------------------------------------

LIVE_CHILD = r"""
import os, sys, threading, time
path, ready = sys.argv[1], int(sys.argv[2])
f = os.open(path, os.O_RDWR)
os.lseek(f, 6, 0)
os.dup2(f, 1); os.dup2(f, 2)
g = os.open(path, os.O_RDWR)
os.lseek(g, 6, 0)
r, w = os.pipe()
threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
os.write(ready, f"{f} {g} {r} {w} {threading.get_native_id()}".encode())
os.read(0, 1)
"""


@contextmanager
def live_child() -> Iterator[tuple[int, str, list[int]]]:
    """A sleeping Python child: (pid, data path, [f, g, pipe_r, pipe_w, main_tid])."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data file.txt")
        Path(path).write_text("hello world\n")
        rd, wr = os.pipe()
        child = subprocess.Popen([sys.executable, "-c", LIVE_CHILD, path, str(wr)],
                                 pass_fds=(wr,), stdin=subprocess.PIPE)
        os.close(wr)
        try:
            info = [int(v) for v in os.read(rd, 100).split()]
            yield child.pid, path, info
        finally:
            os.close(rd)
            child.kill()
            child.wait()
            assert child.stdin is not None
            child.stdin.close()


def test_live_fds_and_kcmp_groups() -> None:
    with live_child() as (pid, path, (f, g, r, w, _)):
        fds = {i.fd: i for i in read_fds(pid)}
        assert fds[f].target == path and fds[f].pos == 6
        assert fds[f].st_ino == os.stat(path).st_ino and fds[f].ino == fds[f].st_ino
        assert classify_fd(fds[f]) == "regular" and classify_fd(fds[r]) == "pipe"
        assert fds[1].pos == fds[g].pos == 6
        groups = open_file_groups(pid)
        assert sorted([1, 2, f]) in groups
        assert [g] in groups
        assert [r] in groups and [w] in groups
        assert all(grp == sorted(grp) for grp in groups)


def test_live_maps_smaps_tasks() -> None:
    with live_child() as (pid, _, _info):
        maps = read_maps(pid)
        assert any(m.path == "[stack]" for m in maps)
        assert any(m.path == sys.executable or m.path == os.path.realpath(sys.executable)
                   for m in maps)
        assert set(read_smaps_vmflags(pid)) == {m.start for m in maps}
        tasks = list_tasks(pid)
        assert len(tasks) == 2 and tasks[0] == pid
        assert not pid_exists(tasks[1])  # a thread, not a process
        assert pid_exists(pid)
        assert read_stat(pid).num_threads == read_status(pid).threads == 2
        assert list_children(os.getpid()) == [pid] or pid in list_children(os.getpid())
        assert read_exe(pid) == os.path.realpath(sys.executable)


def test_live_own_process() -> None:
    me = os.getpid()
    assert any(m.path == "[stack]" for m in read_maps(me))
    assert read_stat(me).ppid == os.getppid()
    assert read_cwd(me) == os.getcwd()
    assert read_comm(me) == read_status(me).name
    assert not is_kernel_thread(me)

    def to_int(v: int) -> int:
        return RLIM_INFINITY if v == resource.RLIM_INFINITY else v

    limits = read_limits(me)
    assert len(limits) == 16
    for lim in limits:
        soft, hard = resource.getrlimit(lim.resource)
        assert (lim.soft, lim.hard) == (to_int(soft), to_int(hard)), lim


def test_live_kernel_thread() -> None:
    assert is_kernel_thread(2)
    assert read_exe(2) == "" and read_cmdline(2) == b""
    def parent(pid: int) -> int | None:
        try:
            return proc.read_stat(pid).ppid
        except NoSuchProcess:  # exited since the listing
            return None

    kthreads = [int(n) for n in os.listdir("/proc") if n.isdigit() and parent(int(n)) == 2]
    assert kthreads and all(is_kernel_thread(k) for k in kthreads[:5])
    assert not is_kernel_thread(1)


def test_live_fd_kinds_of_own_process(tmp_path: Path) -> None:
    me = os.getpid()
    opened: list[int] = []
    try:
        null = os.open("/dev/null", os.O_RDONLY)
        opened.append(null)
        dirfd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
        opened.append(dirfd)
        zero = os.open("/dev/zero", os.O_RDONLY)
        opened.append(zero)
        efd = os.eventfd(0)
        opened.append(efd)
        sock = socket.socket()
        assert classify_fd(read_fd(me, null)) == "dev_null"
        assert classify_fd(read_fd(me, dirfd)) == "directory"
        assert classify_fd(read_fd(me, zero)) == "chardev"
        ev = read_fd(me, efd)
        assert classify_fd(ev) == "anon_inode" and ev.target == "anon_inode:[eventfd]"
        assert ("eventfd-count", "0") in ev.extra
        s = read_fd(me, sock.fileno())
        assert classify_fd(s) == "socket"
        assert describe_fd(s) == f"fd {sock.fileno()} is a socket ({s.target})"
        sock.close()
        master, slave = os.openpty()
        opened += [master, slave]
        assert classify_fd(read_fd(me, slave)) == "tty"
        assert classify_fd(read_fd(me, master)) == "tty"
    finally:
        for fd in opened:
            os.close(fd)


def test_read_fds_skips_fd_closed_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    listed = fds_module.list_fds(os.getpid())
    listed.append(max(listed) + 100)  # listed by /proc, closed before it is read
    monkeypatch.setattr(fds_module, "list_fds", lambda pid, root="/proc": listed)
    try:
        got = [i.fd for i in read_fds(os.getpid())]
        assert r in got and w in got and listed[-1] not in got
    finally:
        os.close(r)
        os.close(w)


def test_thread_lister_sees_new_thread() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert t.native_id in list_tasks(os.getpid())
    finally:
        stop.set()
        t.join()


def test_fixture_fds_without_stat_do_not_silently_vanish() -> None:
    # Dangling "pipe:[...]" symlinks cannot be stat()ed outside the real /proc.
    with pytest.raises(NoSuchProcess, match="fd 0"):
        read_fds(PID, root=ROOT)


def test_mem_available() -> None:
    text = "MemTotal:       32768000 kB\nMemFree:  1000 kB\nMemAvailable:   24110392 kB\n"
    assert proc.parse_mem_available(text) == 24110392 * 1024
    assert proc.parse_mem_available("MemTotal: 1 kB\n") == 0
    assert proc.mem_available() > 0
    assert proc.mem_available(root="/nonexistent") == 0


def test_isolated_scratch_page() -> None:
    """The dump's scratch page keeps a free page on either side (no merge, so soft-dirty
    does not see a neighbour as new), never in a stack's guard gap, never low."""
    from ckpt.collect.tasks import isolated_page
    from ckpt.collect.vmas import VmaInfo, VmaKind

    P = 4096

    def vma(start: int, end: int, kind: VmaKind = VmaKind.ANON_PRIVATE,
            flags: tuple[str, ...] = ()) -> VmaInfo:
        return VmaInfo(start, end, 3, False, kind, 0, "", 0, 0, flags)

    lib = vma(0x7F00_0000_0000, 0x7F00_0001_0000)
    heap = vma(0x7F00_0001_3000, 0x7F00_0002_0000)  # a 3-page gap below it
    stack = vma(0x7FFF_0000_0000, 0x7FFF_0002_0000, VmaKind.STACK)
    vdso = vma(0x7FFF_0010_0000, 0x7FFF_0010_2000, VmaKind.VDSO)
    vsyscall = vma(0xFFFF_FFFF_FF60_0000, 0xFFFF_FFFF_FF60_1000, VmaKind.VSYSCALL)
    at = isolated_page([vdso, heap, vsyscall, stack, lib])  # any order
    assert at == vdso.start - 2 * P  # the highest gap: above the stack, below the vdso
    assert isolated_page([heap, stack, lib]) == heap.start - 2 * P  # not below the stack
    thread_stack = vma(0x7F00_0001_3000, 0x7F00_0002_0000, flags=("gd",))
    assert isolated_page([lib, thread_stack]) == 0
    assert isolated_page([lib, vma(0x7F00_0001_2000, 0x7F00_0002_0000)]) == 0  # 2 pages
    low = [vma(0x400000, 0x401000), vma(0x500000, 0x501000)]
    assert isolated_page(low) == 0
