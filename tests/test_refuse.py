"""A target a restore could not bring back is refused before anything touches it — by
dump, predump and migrate alike — with one line naming what; it runs on, untraced. What
looked unrestorable but is not (a MAP_SHARED mapping of a file open read-write, a
stateless device) is dumped and restored exactly.

The decisions are one table (ckpt.collect.restorable), tested here on records; the
end-to-end cases use examples/targets/unrestorable.py, one mode per case.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    fd_links,
    is_alive,
    needs_root,
    py_target,
    read_lines,
    read_member,
    reap_gone,
    run_ckpt,
    wait_for,
    wait_for_lines,
)

from ckpt.collect.fdkinds import memfd, pipe
from ckpt.collect.fdkinds.base import FdFlags
from ckpt.collect.fds import FdInfo
from ckpt.collect.files import file_kind
from ckpt.collect.mappedfiles import Seen
from ckpt.collect.proc import list_children
from ckpt.collect.restorable import Target, refusals, require_restorable
from ckpt.collect.timers import ProcTimer
from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.errors import NotDumpable
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.timers import SIGEV_SIGNAL, cpu_clock
from ckpt.restore.mm import backing_mode

# --------------------------------------------------------------------------- the table


def vma(path: str, kind: VmaKind, start: int = 0x7F0000000000, inode: int = 42,
        shared: bool = False) -> VmaInfo:
    return VmaInfo(start=start, end=start + 0x4000, prot=3, shared=shared, kind=kind, pgoff=0,
                   path=path, dev=0, inode=inode, vmflags=("rd", "wr", "mr", "mw", "me"))


def fd(n: int, target: str, mode: int = stat.S_IFREG | 0o644, rdev: int = 0) -> FdInfo:
    return FdInfo(fd=n, target=target, pos=0, flags=0o2, mnt_id=1, ino=None, st_mode=mode,
                  st_dev=1, st_ino=1, st_rdev=rdev, st_size=0)


def ptimer(n: int, clock: int = 1) -> ProcTimer:
    return ProcTimer(id=n, signo=14, value=n, notify=SIGEV_SIGNAL, notify_pid=77, clock=clock)


CHR = stat.S_IFCHR | 0o666
FINE = Target(
    pid=77, children=(), cwd="/home/u", root="/", own_root="/", mnt_ns="mnt:[1]",
    own_mnt_ns="mnt:[1]",
    vmas=(vma("/usr/bin/prog", VmaKind.FILE_PRIVATE, 0x400000),
          vma("[heap]", VmaKind.HEAP, 0x500000, inode=0),
          vma("/dev/zero (deleted)", VmaKind.ANON_SHARED, 0x600000, shared=True),
          vma("/data/db", VmaKind.FILE_SHARED, 0x700000, shared=True),
          vma("/dev/shm/q", VmaKind.FILE_SHARED, 0x710000, shared=True),
          vma("/dev/zero", VmaKind.FILE_PRIVATE, 0x720000),
          vma("[vdso]", VmaKind.VDSO, 0x7FFF00000000, inode=0)),
    fds=(fd(0, "/dev/null", CHR, os.makedev(1, 3)), fd(1, "/var/log/out"),
         fd(2, "/dev/pts/3", CHR, os.makedev(136, 3)), fd(3, "/etc", stat.S_IFDIR | 0o755),
         fd(4, "/dev/urandom", CHR, os.makedev(1, 9)), fd(5, "/dev/zero", CHR, os.makedev(1, 5))),
    shell_job=True, thread_cwds=((77, "/home/u"), (78, "/home/u")),
    timers=(ptimer(0), ptimer(1, clock=-6), ptimer(2, clock=cpu_clock(78, 6))))



def in_cwd(cwd: str) -> Target:
    return replace(FINE, cwd=cwd, thread_cwds=((77, cwd), (78, cwd)))


CASES: dict[str, tuple[Target, str]] = {
    "children": (replace(FINE, children=(80, 81)), "has child processes (80, 81)"),
    "cwd in another mount namespace": (
        replace(FINE, mnt_ns="mnt:[2]", foreign=frozenset({"/home/u"})),
        "working directory /home/u in mount namespace mnt:[2], where it is another"),
    "mapping in another mount namespace": (
        replace(FINE, mnt_ns="mnt:[2]", foreign=frozenset({"/data/db"})),
        "maps file /data/db at 0x700000, which is another file (or none) in ckpt's mount"),
    "fd in another mount namespace": (
        replace(FINE, mnt_ns="mnt:[2]", foreign=frozenset({"/var/log/out"})),
        "fd 1 is a regular file (/var/log/out): another file (or none) in ckpt's mount"),
    "chroot": (replace(FINE, root="/srv/jail"), "root directory /srv/jail (chroot)"),
    "deleted cwd, parent gone": (replace(in_cwd("/tmp/d/x (deleted)"), cwd_parent_reachable=False),
                                 "deleted working directory (/tmp/d/x) whose parent no path "
                                 "reaches any more"),
    "deleted cwd migrated": (replace(in_cwd("/tmp/x (deleted)"),
                                     fd_flags=FdFlags(shell_job=True, externals=False,
                                                  migrating=True)),
                             "deleted working directory (/tmp/x): migrate does not carry"),
    "cwd in /proc/PID": (in_cwd("/proc/123/task"), "/proc/123/task under /proc/PID"),
    "thread cwd": (replace(FINE, thread_cwds=((77, "/home/u"), (78, "/srv"))),
                   "threads with their own working directory (thread 78 in /srv;"),
    "hugetlb": (replace(FINE, vmas=(vma("/anon_hugepage (deleted)", VmaKind.FILE_PRIVATE),)),
                "maps huge pages (MAP_HUGETLB) at 0x7f0000000000"),
    "device map": (replace(FINE, vmas=(vma("/dev/dri/card0", VmaKind.FILE_SHARED,
                                           shared=True),)),
                   "maps device /dev/dri/card0 at 0x7f0000000000: its state lives in the"),
    "lease being broken": (replace(FINE, fds=(replace(fd(6, "/tmp/l"), extra=(
        ("lock", "1: LEASE  BREAKING  READ 28275 fe:00:2146650 0 EOF"),)),)),
        "fd 6 is a regular file (/tmp/l): holds a lease being broken by another process's "
        "open (LEASE BREAKING READ), which a restore cannot take again"),
    "pid namespace": (replace(FINE, other_ns=(("pid", "pid:[5]", "pid:[1]"),)),
                      "runs in a pid namespace other than ckpt's (pid:[5]; ckpt's is pid:[1])"),
    "posix timer": (replace(FINE, timers=(ptimer(0), ptimer(3, clock=cpu_clock(1234, 2)))),
                    "has POSIX timer 3 (clock -9878): it measures the CPU time of process "
                    "1234, outside the dump"),
    "thread clock": (replace(FINE, timers=(ptimer(1, clock=-2),)),
                     "has POSIX timer 1 (clock -2): it measures the CPU time of the thread"),
    "sparse timer ids": (replace(FINE, timers=(ptimer(5000),), timer_ids_exact=False),
                         "has POSIX timer ids up to 5000, and this kernel cannot create"),
    "many groups": (replace(FINE, groups=9000), "has 9000 supplementary groups"),
    "shared anon alias": (replace(FINE, vmas=(
        vma("/dev/zero (deleted)", VmaKind.ANON_SHARED, 0x1000000, inode=9, shared=True),
        vma("/dev/zero (deleted)", VmaKind.ANON_SHARED, 0x2000000, inode=9, shared=True))),
        "maps one shared anonymous memory at two addresses (0x1000000 and 0x2000000)"),
    "sysv shm unlisted": (replace(FINE, vmas=(vma("/SYSV00000000 (deleted)",
                                                  VmaKind.SYSV_SHM, inode=5, shared=True),)),
                          "attaches System V shared memory 5 at 0x7f0000000000, which "
                          "/proc/sysvipc/shm does not list"),
    "aio": (replace(FINE, vmas=(vma("/[aio] (deleted)", VmaKind.FILE_SHARED, shared=True),)),
            "maps an AIO ring (io_setup) at 0x7f0000000000"),
    "memfd map": (replace(FINE, vmas=(vma("/memfd:buf (deleted)", VmaKind.FILE_SHARED,
                                          shared=True),),
                          mapped=((0x7F0000000000, Seen(memfd.Found(2 << 20, 0, False, True))),)),
                  "maps a memfd (/memfd:buf) at 0x7f0000000000: a memfd of 2097152 bytes, "
                  "above --ghost-limit (1048576 bytes): --ghost-limit 2097152 or more"),
    "memfd map migrated": (replace(FINE, vmas=(vma("/memfd:buf (deleted)", VmaKind.FILE_SHARED,
                                                   shared=True),),
                                   mapped=((0x7F0000000000,
                                            Seen(memfd.Found(10, 0, False, True))),),
                                   fd_flags=FdFlags(shell_job=True, externals=False,
                                                  migrating=True)),
                           "maps a memfd (/memfd:buf) at 0x7f0000000000: migrate does not "
                           "carry mapped memfds and deleted files yet"),
    "deleted map": (replace(FINE, vmas=(vma("/tmp/x (deleted)", VmaKind.FILE_PRIVATE),),
                            mapped=((0x7F0000000000, Seen(memfd.Found(9, 1, False, True))),)),
                    "maps deleted file /tmp/x at 0x7f0000000000: /tmp/x was deleted but the "
                    "file has 1 other link(s)"),
    "memfd map held": (replace(FINE, vmas=(vma("/memfd:buf (deleted)", VmaKind.FILE_SHARED,
                                               shared=True),),
                               mapped=((0x7F0000000000, Seen(memfd.Found(9, 0, False, True),
                                                             (12, 13))),)),
                       "maps a memfd (/memfd:buf) at 0x7f0000000000: processes 12, 13 outside "
                       "the dump also map it or hold it open"),
    "deleted map, no directory": (
        replace(FINE, vmas=(vma("/tmp/d/x (deleted)", VmaKind.FILE_SHARED, shared=True),),
                mapped=((0x7F0000000000, Seen(memfd.Found(9, 0, False, False))),)),
        "maps deleted file /tmp/d/x at 0x7f0000000000: the directory of deleted file "
        "/tmp/d/x is gone too"),
    "anon inode map": (replace(FINE, vmas=(vma("anon_inode:[io_uring]", VmaKind.FILE_SHARED,
                                               shared=True),)),
                       "maps anon_inode:[io_uring] at 0x7f0000000000, not a file"),
    "tty without --shell-job": (replace(FINE, shell_job=False),
                                "fd 2 is a tty (/dev/pts/3): a terminal; use --shell-job"),
    "tty above 2": (replace(FINE, fds=(fd(7, "/dev/pts/3", CHR, os.makedev(136, 3)),)),
                    "fd 7 is a tty"),
    "socket": (replace(FINE, fds=(fd(6, "socket:[99]", stat.S_IFSOCK | 0o777),)),
               "fd 6 is a socket (socket:[99]): not supported yet"),
    "foreign fifo": (replace(FINE, fds=(fd(6, "/run/f", stat.S_IFIFO | 0o600),),
                             foreign=frozenset({"/run/f"}), fd_kinds=((6, pipe.KIND, pipe.PipeState(
                                 ino=5, fifo=True, reads=True, writes=False, carrier=True,
                                 packet=False)),)),
                     "fd 6 is a pipe (/run/f): another file (or none) in ckpt's mount"),
    "shared pipe": (replace(FINE, fds=(fd(6, "pipe:[99]", stat.S_IFIFO | 0o600),),
                            fd_kinds=((6, pipe.KIND, pipe.PipeState(
                                ino=99, fifo=False, reads=True, writes=True, carrier=True,
                                packet=False, outside=(1234,))),)),
                    "fd 6 is a pipe (pipe:[99]): a pipe with both ends in the process, also "
                    "held by process 1234 outside the dump"),
    "eventfd": (replace(FINE, fds=(fd(6, "anon_inode:[eventfd]", 0o600),)),
                "fd 6 is an anon inode (anon_inode:[eventfd])"),
    "memfd fd": (replace(FINE, fds=(fd(6, "/memfd:buf (deleted)"),),
                         fd_kinds=((6, memfd.MEMFD, memfd.Found(0, 0, True, True)),)),
                 "fd 6 is a regular file (/memfd:buf (deleted)): a memfd of huge pages"),
    "deleted fd": (replace(FINE, fds=(fd(6, "/tmp/x (deleted)"),),
                           fd_kinds=((6, memfd.GHOST, memfd.Found(9, 1, False, True)),)),
                   "/tmp/x was deleted but the file has 1 other link(s)"),
    "deleted directory fd": (replace(FINE, fds=(fd(6, "/tmp/d (deleted)", stat.S_IFDIR),)),
                             "fd 6 is a directory (/tmp/d (deleted)): the file was deleted"),
    "namespace fd": (replace(FINE, fds=(fd(6, "net:[4026531833]", stat.S_IFREG | 0o444),)),
                     "fd 6 is a regular file (net:[4026531833]): a namespace file"),
    "fd in /proc/PID": (replace(FINE, fds=(fd(6, "/proc/123/status"),)),
                        "fd 6 is a regular file (/proc/123/status): a file of a process"),
    "kmsg": (replace(FINE, fds=(fd(6, "/dev/kmsg", CHR, os.makedev(1, 11)),)),
             "fd 6 is a character device (/dev/kmsg): a character device 1:11"),
    "block device": (replace(FINE, fds=(fd(6, "/dev/loop0", stat.S_IFBLK | 0o600),)),
                     "fd 6 is a special file (/dev/loop0): not supported yet"),
}


def test_a_restorable_target_is_not_refused() -> None:
    assert refusals(FINE) == []
    assert refusals(replace(FINE, root="")) == []  # exiting: its root reads as nothing
    assert require_restorable(FINE) == list(FINE.vmas)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_unrestorable_thing_is_refused_by_name(case: str) -> None:
    target, says = CASES[case]
    found = refusals(target)
    assert len(found) == 1 and says in found[0], found
    with pytest.raises(NotDumpable, match="^" + re.escape(found[0]) + "$"):
        require_restorable(target)


def test_only_a_migration_refuses_what_migrate_does_not_carry() -> None:
    """FdFlags.migrating, not FdFlags.externals, refuses System V shared memory, mapped
    memfds and a deleted working directory: a local dump refusing external objects takes
    them."""
    target = replace(in_cwd("/tmp/x (deleted)"),
                     vmas=(vma("/memfd:buf (deleted)", VmaKind.FILE_SHARED, shared=True),
                           vma("/SYSV00000000 (deleted)", VmaKind.SYSV_SHM, 0x1000000,
                               inode=5, shared=True)),
                     mapped=((0x7F0000000000, Seen(memfd.Found(10, 0, False, True))),))
    local = refusals(replace(target, fd_flags=FdFlags(shell_job=True, externals=False)))
    assert not [line for line in local if "migrate" in line], local
    moved = refusals(replace(target, fd_flags=FdFlags(shell_job=True, externals=False,
                                                      migrating=True)))
    assert [w for w in ("working directory", "System V", "memfd")
            if not any(w in line and "migrate" in line for line in moved)] == [], moved


def test_refusals_come_in_order_and_the_first_is_told() -> None:
    target = replace(FINE, children=(9,), vmas=(vma("/b (deleted)", VmaKind.FILE_PRIVATE, 0x2000),
                                                vma("/a (deleted)", VmaKind.FILE_PRIVATE, 0x1000)),
                     fds=(fd(8, "pipe:[1]", stat.S_IFIFO), fd(6, "socket:[2]", stat.S_IFSOCK)))
    found = refusals(target)
    assert [line.split()[2 if line.startswith("process") else 1] for line in found] == \
        ["has", "maps", "maps", "6", "8"]
    assert "/a at 0x1000" in found[1]
    with pytest.raises(NotDumpable, match=r"has child processes \(9\).*\(and 4 more\)$"):
        require_restorable(target)


def test_split_shared_anonymous_memory_is_no_alias() -> None:
    """An mprotect split leaves two VMAs of one object at other offsets: restorable."""
    lo = vma("/dev/zero (deleted)", VmaKind.ANON_SHARED, 0x1000000, inode=9, shared=True)
    hi = replace(lo, start=lo.end, end=lo.end + 0x4000, pgoff=lo.length)
    assert refusals(replace(FINE, vmas=(lo, hi))) == []


def test_file_kind_follows_the_table() -> None:
    kinds = {f.fd: file_kind(f, True) for f in FINE.fds}
    assert kinds == {0: "dev_null", 1: "path", 2: "inherited", 3: "path", 4: "path", 5: "path"}
    with pytest.raises(NotDumpable, match="a namespace file"):
        file_kind(fd(6, "net:[1]", stat.S_IFREG | 0o444), True)


def test_backing_mode_of_shared_mappings() -> None:
    """A MAP_SHARED mapping is restored on an O_RDWR file when it may be written ("mw":
    its file was open for writing), even while it is read-only."""
    def v(prot: int, shared: bool, flags: tuple[str, ...]) -> pb.Vma:
        return pb.Vma(path="/f", prot=prot, shared=shared, vmflags=list(flags))

    assert backing_mode(v(1, True, ("rd", "sh", "mr", "mw", "me", "ms"))) == os.O_RDWR
    assert backing_mode(v(3, True, ("rd", "wr", "sh", "mr", "mw"))) == os.O_RDWR
    assert backing_mode(v(1, True, ("rd", "mr", "me", "ms"))) == os.O_RDONLY
    assert backing_mode(v(3, False, ("rd", "wr", "mr", "mw"))) == os.O_RDONLY  # private
    assert backing_mode(v(3, True, ())) == os.O_RDWR  # no VmFlags recorded: by prot
    assert backing_mode(v(1, True, ())) == os.O_RDONLY


# --------------------------------------------------------------------------- live targets

REFUSED = {
    "deleted-map": ["maps deleted file", "gone.bin at 0x", "has 1 other link(s)"],
    "aio": ["maps an AIO ring (io_setup) at 0x"],
    "deleted-cwd": ["deleted working directory", "/p/cwd)", "whose parent no path reaches"],
    "proc-cwd": ["working directory /proc/", "under /proc/PID"],
    "netns-fd": ["fd 3 ", "net:[", "a namespace file"],
    "memfd": ["maps a memfd (/memfd:ckpt-test) at 0x", "above --ghost-limit",
              "--ghost-limit 2097152 or more"],
    "deleted-fd": ["fd 3 ", "gone.txt (deleted)", "above --ghost-limit", "--ghost-limit 2097152"],
    "sysv-partial": ["System V shared memory", "in part (unmapped inside)"],
    "fanotify": ["fd 3 ", "anon_inode:[fanotify]"],
    "chroot": ["root directory", "(chroot)"],
    "kmsg-fd": ["fd 3 ", "/dev/kmsg", "character device 1:11"],
    "thread-cwd": ["threads with their own working directory", "/w;"],
    "deleted-fifo": ["fd 3 ", "/fifo (deleted)", "a FIFO that was deleted"],
    "eventfd-flock": ["fd 3 is an anon inode (anon_inode:[eventfd]): holds a FLOCK lock on a "
                      "file a restore does not reopen by path"],
    "posix-timer": ["has POSIX timer 0 (clock ", "it measures the CPU time of process "],
    "shm-alias": ["maps one shared anonymous memory at two addresses"],
}


def launch(harness: Harness, mode: str, tmp_path: Path,
           prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / "out.txt"
    where = tmp_path / "w"
    where.mkdir(exist_ok=True)
    proc = harness.launch([*prefix, *py_target("unrestorable.py"), mode, where], out)
    line = wait_for_lines(out, 2)[0]
    assert line.startswith("ready"), line
    return proc, out


def assert_runs_on(proc: subprocess.Popen[bytes], out: Path) -> None:
    assert proc.poll() is None, f"target died (status {proc.returncode})"
    assert_running_untraced(proc.pid)
    wait_for_lines(out, len(read_lines(out)) + 2)


@needs_root
def test_a_members_parent_death_signal_comes_back_with_the_tree(harness: Harness,
                                                                tmp_path: Path) -> None:
    """A process with a child that set a parent-death signal (SIGKILL): predump and dump
    take the tree (the child's parent is restored with it), and after restore the signal
    is the child's again: killing the restored parent kills the child."""
    proc, out = launch(harness, "child", tmp_path)
    child = int(read_lines(out)[0].split()[1])
    harness.track(child)
    assert_ckpt_ok(run_ckpt("predump", "-t", str(proc.pid), "-D", harness.images("predump")))
    assert_runs_on(proc, out)
    images = harness.images("dump")
    harness.dump_and_reap(proc, images)
    reap_gone([child])
    root = harness.restore_detached(images)
    assert root == proc.pid and is_alive(child)
    assert read_member(child) is not None and read_member(child).ppid == root  # type: ignore[union-attr]
    os.kill(root, signal.SIGKILL)
    wait_for(lambda: not is_alive(child) or None, 10, "the child to die with its parent")


KMSG_CHILD = """
import os, time
if os.fork() == 0:
    os.open("/dev/kmsg", os.O_RDONLY)  # fd 3: a device whose state lives in the driver
    print("child", os.getpid(), flush=True)
while True:
    time.sleep(1)
"""


@needs_root
def test_predump_and_dump_of_a_tree_name_the_member_they_refuse(harness: Harness,
                                                                tmp_path: Path) -> None:
    """A member's fd refused before the freeze: predump and dump print the same one
    line, naming the member and its fd; the tree runs on untouched."""
    out = tmp_path / "out.txt"
    proc = harness.launch([sys.executable, "-c", KMSG_CHILD], out)
    child = int(wait_for_lines(out, 1)[0].split()[1])
    lines = []
    for action in ("predump", "dump"):
        images = harness.images(action)
        msg = assert_one_error_line(run_ckpt(action, "-t", str(proc.pid), "-D", images))
        assert f"process {child}: fd 3 " in msg and "/dev/kmsg" in msg, msg
        assert not (images / "inventory.img").exists()
        lines.append(msg)
    assert lines[0] == lines[1]
    assert_running_untraced(proc.pid)
    assert_running_untraced(child)


@needs_root
@pytest.mark.parametrize("mode", sorted(REFUSED))
def test_dump_and_predump_refuse_before_touching(harness: Harness, tmp_path: Path,
                                                mode: str) -> None:
    """Each case: dump refuses with one line naming it, so does predump (the same line:
    a pass of a process the final dump refuses is wasted), nothing is written, and the
    target runs on untraced."""
    proc, out = launch(harness, mode, tmp_path)
    lines = []
    for action in ("dump", "predump"):
        images = harness.images(action)
        message = assert_one_error_line(run_ckpt(action, "-t", str(proc.pid), "-D", images))
        for part in REFUSED[mode]:
            assert part in message, message
        assert not (images / "inventory.img").exists()
        lines.append(message)
        assert_runs_on(proc, out)
    assert lines[0] == lines[1]


@needs_root
@pytest.mark.parametrize("kind", ["pid", "user"])
def test_another_pid_or_user_namespace_is_refused(harness: Harness, tmp_path: Path,
                                                  kind: str) -> None:
    """Restore creates the process in ckpt's namespaces: in another pid namespace its pid
    would change, in another user namespace its ids and capabilities would."""
    unshare = ("unshare", "--pid", "--fork", "--kill-child") if kind == "pid" else \
        ("unshare", "--user", "-r")
    proc, out = launch(harness, "plain", tmp_path, unshare)
    pid = proc.pid
    if kind == "pid":  # unshare waits for the target, its child
        pid = wait_for(lambda: next(iter(list_children(proc.pid)), None), 10, "the target")
    message = assert_one_error_line(run_ckpt("dump", "-t", str(pid), "-D", harness.images()))
    assert f"runs in a {kind} namespace other than ckpt's" in message, message
    assert_running_untraced(pid)
    wait_for_lines(out, len(read_lines(out)) + 2)


@needs_root
def test_a_file_only_another_mount_namespace_has_is_refused(harness: Harness,
                                                           tmp_path: Path) -> None:
    """A process in another mount namespace may be dumped (`ip netns exec` makes one;
    tests/test_migrate.py migrates such a process), but not one using a path that names
    another file, or none, where ckpt (and so restore) runs: here a tmpfs only the
    target's namespace has, holding the file it maps."""
    where = tmp_path / "w"
    where.mkdir()
    shell = f"mount -t tmpfs ckpt-test {where} && exec \"$@\""
    proc, out = launch(harness, "shared-rw", tmp_path,
                       ("unshare", "-m", "--propagation", "private", "sh", "-c", shell, "sh"))
    assert not (where / "shared.bin").exists()
    message = assert_one_error_line(run_ckpt("dump", "-t", str(proc.pid), "-D", harness.images()))
    assert f"maps file {where}/shared.bin at 0x" in message, message
    assert "another file (or none) in ckpt's mount namespace" in message, message
    assert_runs_on(proc, out)


def shared_counter(path: Path) -> int:
    value: int = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return value


@needs_root
@pytest.mark.parametrize("mode", ["shared-rw", "shared-mprotect"])
def test_shared_writable_file_mapping_restores_onto_the_file(harness: Harness, tmp_path: Path,
                                                            mode: str) -> None:
    """A MAP_SHARED mapping of a file open read-write comes back on the same file, writable:
    mapped a second time read-only first (shared-rw), or read-only at the dump and made
    writable again by the process (shared-mprotect). Its writes after the restore reach
    the file."""
    proc, out = launch(harness, mode, tmp_path)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    data = tmp_path / "w" / "shared.bin"
    at_dump = shared_counter(data)
    pid = harness.restore_detached(images)
    wait_for(lambda: shared_counter(data) >= at_dump + 5 or None, 20,
             "the restored process to write its mapping")
    assert not [line for line in read_lines(out) if line.startswith("store failed")]
    assert_running_untraced(pid)


@needs_root
def test_stateless_device_fd_restores(harness: Harness, tmp_path: Path) -> None:
    """/dev/zero (like /dev/null, full, random, urandom) keeps no state: reopened by path."""
    proc, out = launch(harness, "dev-zero-fd", tmp_path)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    pid = harness.restore_detached(images)
    assert fd_links(pid)[3] == "/dev/zero"
    before = len(read_lines(out))
    wait_for_lines(out, before + 3)


@needs_root
def test_migrate_refuses_before_its_first_round(harness: Harness, tmp_path: Path) -> None:
    """migrate checks the source like dump before it connects anywhere: no server needed
    to see the refusal, and nothing is sent."""
    proc, out = launch(harness, "memfd", tmp_path)
    token = tmp_path / "token"
    token.write_text("t\n")
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", "127.0.0.1:1",
                   "--auth-token-file", token)
    message = assert_one_error_line(res)
    assert "maps a memfd" in message and "migrate does not carry" in message, message
    assert_runs_on(proc, out)
