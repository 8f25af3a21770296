"""An object or open file another process holds too is refused before the freeze, naming
the fd and the other process: a restore would give the dumped process a copy of its own
(a listener could not bind its port, or would split its connections with the old one; an
eventfd, memfd, ... would be cut off from its peer) or lose what the open file shares
(its flock, its position). ckpt.collect.holders finds them, ckpt.collect.restorable
refuses them; the target runs on untouched.

The live cases are F15/F16's: the test is the parent that keeps its copy of what it gave
the target (examples/targets/fd_shared.py), as a process that forked the dumped one would.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import socket
import stat
import time
from dataclasses import replace
from pathlib import Path

from conftest import (
    Asker,
    Harness,
    assert_one_error_line,
    assert_running_untraced,
    needs_root,
    read_lines,
    run_ckpt,
)

from ckpt.collect.fdkinds import eventfd, pipe
from ckpt.collect.fdkinds.base import HOLDERS, FdKind, Peek
from ckpt.collect.fds import FdInfo, read_fds
from ckpt.collect.holders import (
    Sharing,
    holders_of,
    parse_maps_line,
    scan_links,
    scan_maps,
)
from ckpt.collect.restorable import Target, compares_open_file, refusals
from ckpt.errors import NoSuchProcess

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)

# --------------------------------------------------------------------------- the scan


def fake_proc(root: Path, links: dict[str, dict[str, str]]) -> None:
    for pid, fds in links.items():
        (root / pid / "fd").mkdir(parents=True)
        for fd, link in fds.items():
            os.symlink(link, root / pid / "fd" / fd)


def test_scan_links_reads_every_process_fd_links(tmp_path: Path) -> None:
    fake_proc(tmp_path, {"10": {"0": "pipe:[7]", "1": "/dev/null"}, "11": {"4": "/tmp/f"},
                         "12": {"3": "pipe:[7]"}, "self": {"0": "pipe:[7]"},
                         "14": {"5": "pipe:[7]", "6": "anon_inode:[eventfd]"}})
    (tmp_path / "13").mkdir()  # a process that exited meanwhile: no fd directory
    found = scan_links({"pipe:[7]", "/tmp/f", "anon_inode:[eventfd]", "pipe:[8]"},
                       exclude={12}, root=str(tmp_path))
    assert {k: sorted(v) for k, v in found.items()} == {
        "pipe:[7]": [(10, 0), (14, 5)], "/tmp/f": [(11, 4)], "anon_inode:[eventfd]": [(14, 6)]}


def info(fd: int, target: str, mode: int = stat.S_IFREG | 0o644, flags: int = os.O_RDWR,
         dev: int = 1, ino: int = 1, locks: tuple[str, ...] = ()) -> FdInfo:
    return FdInfo(fd=fd, target=target, pos=0, flags=flags, mnt_id=1, ino=None, st_mode=mode,
                  st_dev=dev, st_ino=ino, st_rdev=0, st_size=0,
                  extra=tuple(("lock", v) for v in locks))


def test_holders_compare_the_way_the_kind_says(tmp_path: Path) -> None:
    (tmp_path / "same").write_bytes(b"")
    (tmp_path / "other").write_bytes(b"")
    fake_proc(tmp_path, {"20": {"3": str(tmp_path / "same")},
                         "21": {"4": str(tmp_path / "other")}})
    st = os.stat(tmp_path / "same")
    ghost = info(5, "/x (deleted)", dev=st.st_dev, ino=st.st_ino)
    both = [(20, 3), (21, 4)]
    # a socket's link names it: every candidate holds it
    assert holders_of(Sharing.OBJECT, 9, ghost, both, str(tmp_path)) == (20, 21)
    # a memfd or deleted file: the candidates' inodes
    assert holders_of(Sharing.INODE, 9, ghost, both, str(tmp_path)) == (20,)
    # an anon inode: kcmp on each candidate (one that vanished meanwhile holds nothing)

    def same_file(pid: int, fd: int, other: int, other_fd: int) -> bool:
        assert (pid, fd) == (9, 5)
        if other == 21:
            raise NoSuchProcess(21, "kcmp")
        return (other, other_fd) == (20, 3)

    assert holders_of(Sharing.OPEN_FILE, 9, ghost, [*both, (20, 7)], str(tmp_path),
                      same_file) == (20,)
    assert holders_of(Sharing.OWN, 9, ghost, both, str(tmp_path)) == ()


def test_maps_lines_and_the_maps_scan(tmp_path: Path) -> None:
    assert parse_maps_line("7f9caf24c000-7f9caf24d000 rw-s 00000000 00:01 504        "
                           "   /memfd:a pool (deleted)\n") == (os.makedev(0, 1), 504,
                                                               "/memfd:a pool (deleted)")
    assert parse_maps_line("7ffd1000-7ffd2000 rw-p 00000000 00:00 0 \n") is None
    assert parse_maps_line("7ffd1000-7ffd2000 r-xp 00000000 00:00 0      [vdso]\n") == (
        0, 0, "[vdso]")
    for pid, text in {"30": "1000-2000 rw-s 00000000 00:01 504 /memfd:p (deleted)\n"
                            "3000-4000 r--p 00000000 fe:00 77 /usr/lib/x.so\n",
                      "31": "1000-2000 rw-s 00000000 00:01 505 /memfd:p (deleted)\n"}.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "maps").write_text(text)
    (tmp_path / "32").mkdir()  # exited: no maps
    found = scan_maps({"/memfd:p (deleted)"}, exclude=(), root=str(tmp_path))
    assert sorted(found["/memfd:p (deleted)"]) == [(30, os.makedev(0, 1), 504),
                                                   (31, os.makedev(0, 1), 505)]
    memfd = info(5, "/memfd:p (deleted)", dev=os.makedev(0, 1), ino=505)
    assert holders_of(Sharing.INODE, 9, memfd, [], str(tmp_path),
                      mapped=found["/memfd:p (deleted)"]) == (31,)


def test_peek_finds_a_shared_eventfd_and_not_a_private_one() -> None:
    """Live: a child that inherited one of our two eventfds (the same link text) holds
    that one, found by kcmp, and not the other; we look at ourselves as ckpt would look
    at a target, from outside (Peek leaves out ckpt's own pid: here the child's parent)."""
    shared, private = os.eventfd(0), os.eventfd(0)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(private)
        os.write(ready_w, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        mine = {i.fd: i for i in read_fds(os.getpid())}
        with Peek(os.getpid(), list(mine.values())) as peek:
            found = {fd: peek.holders(mine[fd], Sharing.OPEN_FILE) for fd in (shared, private)}
            assert HOLDERS in peek.memo  # one scan for both
        assert found == {shared: (pid,), private: ()}
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        for fd in (shared, private, ready_r, ready_w):
            os.close(fd)


# --------------------------------------------------------------------------- decisions


BASE = Target(pid=77, children=(), cwd="/", root="/", own_root="/", mnt_ns="mnt:[1]",
              own_mnt_ns="mnt:[1]", vmas=(), fds=(), shell_job=False)
FLOCK = "1: FLOCK  ADVISORY  WRITE 77 fe:00:1311 0 EOF"
POSIX = "2: POSIX  ADVISORY  WRITE 77 fe:00:1311 0 EOF"


def refused(*fds: FdInfo, held: tuple[int, ...] = (80,),
            kinds: tuple[tuple[int, FdKind, object], ...] = ()) -> list[str]:
    return refusals(replace(BASE, fds=fds, fd_kinds=kinds,
                            holders=tuple((i.fd, held) for i in fds) if held else ()))


def test_an_object_of_a_kind_held_elsewhere_is_refused_naming_the_process() -> None:
    efd = info(3, "anon_inode:[eventfd]", mode=0o600)
    [line] = refused(efd, held=(80, 91), kinds=((3, eventfd.KIND, None),))
    assert line.startswith("fd 3 is an anon inode (anon_inode:[eventfd]): one eventfd that "
                           "processes 80, 91 outside the dump also holds")
    assert refused(efd, held=(), kinds=((3, eventfd.KIND, None),)) == []


def test_a_pipe_judges_its_holders_itself() -> None:
    """A pipe's holders decide whether it is external (pipe.refuse), not the framework."""
    end = info(3, "pipe:[9]", mode=stat.S_IFIFO | 0o600, flags=os.O_WRONLY, ino=9)
    state = pipe.state_of(end, [end], outside=(80,))
    assert refused(end, kinds=((3, pipe.KIND, state),)) == []


def test_a_shared_open_file_is_refused_with_its_lock_first() -> None:
    locked = info(4, "/var/lib/app.lock", locks=(FLOCK,))
    [line] = refused(locked)
    assert line == ("fd 4 is a regular file (/var/lib/app.lock): holds a FLOCK ADVISORY "
                    "WRITE lock on an open file process 80 shares (inherited across fork() or "
                    "passed over a unix socket): the lock would stay with it and a restore "
                    "could not take it again: not supported yet")
    [line] = refused(info(4, "/data/x", locks=(POSIX,)))  # the process's: no lock line
    assert "an open file process 80 shares" in line
    assert "its position and flags would no longer be shared" in line
    assert refused(info(4, "/data/x", locks=(FLOCK,)), held=()) == []


def test_a_shared_append_only_writer_is_not_refused_unless_it_holds_a_lock() -> None:
    log = os.O_WRONLY | os.O_APPEND
    assert refused(info(1, "/var/log/app.log", flags=log)) == []
    assert refused(info(1, "/var/log/app.log", flags=log, locks=(POSIX,))) == []
    [line] = refused(info(1, "/var/log/app.log", flags=log, locks=(FLOCK,)))
    assert "holds a FLOCK ADVISORY WRITE lock on an open file process 80 shares" in line
    assert refused(info(1, "/var/log/app.log", flags=os.O_RDWR | os.O_APPEND)) != []


def test_which_open_files_are_compared() -> None:
    assert compares_open_file(info(3, "/etc/hosts"))
    assert compares_open_file(info(3, "/etc", mode=stat.S_IFDIR | 0o755))
    assert not compares_open_file(info(3, "/etc/hosts", flags=os.O_PATH))
    assert not compares_open_file(info(3, "/dev/null", mode=stat.S_IFCHR | 0o666))


def test_check_prints_the_held_elsewhere_rules() -> None:
    res = run_ckpt("check")
    assert res.returncode == 0, res.describe()
    lines = [line.strip() for line in res.stdout.splitlines()]
    assert ("refused (fd): one … that … outside the dump also holds (inherited across "
            "fork() or passed over a unix socket): a restore would make a new one for "
            "this process alone, cut off from it: not supported yet") in lines
    assert any(line.startswith("refused (fd): an open file … shares") for line in lines)
    assert any(line.startswith("refused (fd): holds … on an open file … shares")
               for line in lines)


# --------------------------------------------------------------------------- live


def assert_refused_untouched(target: Asker, expected: str) -> None:
    """dump and predump refuse the target before the freeze with ``expected``; it runs."""
    for action in ("dump", "predump"):
        images = target.out.parent / f"images-{action}"
        images.mkdir(exist_ok=True)
        line = assert_one_error_line(run_ckpt(action, "-t", str(target.proc.pid), "-D", images))
        assert expected in line, line
        assert not (images / "inventory.img").exists()
        assert_running_untraced(target.proc.pid)


@needs_root
def test_a_listener_shared_with_the_parent_is_refused(harness: Harness) -> None:
    """F15: the parent holds the listener the dumped process listens on; a restore could
    not bind its port (or, with SO_REUSEPORT, would split connections with it)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    fd, port = lsock.fileno(), lsock.getsockname()[1]
    try:
        target = Asker(harness, "fd_shared.py", "listener", str(fd), pass_fds=(fd,))
        assert target.ask() == {"port": port, "listens": 1}
        assert_refused_untouched(target, (
            f"fd {fd} is a socket (socket:[{os.fstat(fd).st_ino}]): one inet socket that "
            f"process {os.getpid()} outside the dump also holds"))
        assert target.ask() == {"port": port, "listens": 1}
    finally:
        lsock.close()


@needs_root
def test_an_eventfd_shared_with_the_parent_is_refused(harness: Harness) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        target = Asker(harness, "fd_shared.py", "eventfd", str(efd), pass_fds=(efd,))
        assert target.ask() == {"added": 1}
        assert_refused_untouched(target, (
            f"fd {efd} is an anon inode (anon_inode:[eventfd]): one eventfd that process "
            f"{os.getpid()} outside the dump also holds"))
        assert target.ask() == {"added": 1}
        assert os.eventfd_read(efd) == 2  # still one eventfd for both
    finally:
        os.close(efd)


@needs_root
def test_a_memfd_shared_with_the_parent_is_refused(harness: Harness) -> None:
    mfd = os.memfd_create("pool")
    try:
        target = Asker(harness, "fd_shared.py", "file", str(mfd), pass_fds=(mfd,))
        assert target.ask() == {"pos": 5}
        assert_refused_untouched(target, (
            f"fd {mfd} is a regular file (/memfd:pool (deleted)): one memfd that process "
            f"{os.getpid()} outside the dump also holds"))
        assert target.ask() == {"pos": 10}
        assert os.pread(mfd, 20, 0) == b"line\nline\n"
    finally:
        os.close(mfd)


@needs_root
def test_a_memfd_the_parent_only_maps_is_refused(harness: Harness) -> None:
    """A Wayland-like pool: the parent maps the memfd and closes its fd; the dumped
    process holds the fd. A restore would give it a copy the parent never sees."""
    mfd = os.memfd_create("pool")
    os.ftruncate(mfd, PAGE)
    libc.mmap.restype = ctypes.c_void_p
    addr = libc.mmap(None, PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, mfd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    try:
        target = Asker(harness, "fd_shared.py", "file", str(mfd), pass_fds=(mfd,))
        os.close(mfd)  # the mapping alone holds it now, as a compositor's does
        assert target.ask() == {"pos": 5}
        assert_refused_untouched(target, (
            f"fd {mfd} is a regular file (/memfd:pool (deleted)): one memfd that process "
            f"{os.getpid()} outside the dump also holds"))
        assert target.ask() == {"pos": 10}
        assert ctypes.string_at(addr, 10) == b"line\nline\n"
    finally:
        libc.munmap(ctypes.c_void_p(addr), PAGE)


@needs_root
def test_a_flock_on_an_open_file_shared_with_the_parent_is_refused(harness: Harness,
                                                                    tmp_path: Path) -> None:
    """F16: the flock belongs to the open file the parent shares; the dump would leave
    it held by the parent and the restore could not take it again."""
    lfd = os.open(tmp_path / "app.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lfd, fcntl.LOCK_EX)
        target = Asker(harness, "fd_shared.py", "file", str(lfd), pass_fds=(lfd,))
        assert target.ask() == {"pos": 5}
        assert_refused_untouched(target, (
            f"fd {lfd} is a regular file ({tmp_path}/app.lock): holds a FLOCK ADVISORY "
            f"WRITE lock on an open file process {os.getpid()} shares"))
        assert target.ask() == {"pos": 10}
        assert os.lseek(lfd, 0, os.SEEK_CUR) == 10  # one open file, one position
    finally:
        os.close(lfd)


@needs_root
def test_a_file_position_shared_with_the_parent_is_refused(harness: Harness,
                                                           tmp_path: Path) -> None:
    ffd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        target = Asker(harness, "fd_shared.py", "file", str(ffd), pass_fds=(ffd,))
        assert target.ask() == {"pos": 5}
        assert_refused_untouched(target, (
            f"fd {ffd} is a regular file ({tmp_path}/data): an open file process "
            f"{os.getpid()} shares (inherited across fork() or passed over a unix socket): "
            "a restore reopens it for this process alone"))
        assert target.ask() == {"pos": 10}
    finally:
        os.close(ffd)


@needs_root
def test_a_shared_append_only_log_is_dumped_and_restored(harness: Harness,
                                                         tmp_path: Path) -> None:
    """Write-only O_APPEND: every write lands at the end whoever shares the open file, so
    the dump goes on; the restored process appends after the parent's lines."""
    log = tmp_path / "app.log"
    lfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        target = Asker(harness, "fd_shared.py", "file", str(lfd), pass_fds=(lfd,))
        assert target.ask() == {"pos": 5}
        images = harness.images()
        harness.dump_and_reap(target.proc, images)
        os.write(lfd, b"parent\n")
        harness.restore_detached(images)
        assert target.ask() == {"pos": 17}
        assert read_lines(log) == ["line", "parent", "line"]
    finally:
        os.close(lfd)

