"""Readers for /proc/PID files: one small function per file, each returning a typed record.

Every reader takes ``pid`` and a keyword ``root`` (default "/proc") so it runs on captured
trees too.  :func:`proc_errors` maps a vanished file (ENOENT/ESRCH) to NoSuchProcess and a
refused read to AccessDenied.  Text is decoded with ``surrogateescape`` (non-UTF-8 paths).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ckpt.errors import AccessDenied, NoSuchProcess

PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4
PF_KTHREAD = 0x00200000
KTHREADD_PID = 2
RLIM_INFINITY = 2**64 - 1

#: Row titles of /proc/PID/limits; the index is the RLIMIT_* resource number (0..15).
LIMIT_NAMES: tuple[str, ...] = (
    "Max cpu time", "Max file size", "Max data size", "Max stack size",
    "Max core file size", "Max resident set", "Max processes", "Max open files",
    "Max locked memory", "Max address space", "Max file locks", "Max pending signals",
    "Max msgqueue size", "Max nice priority", "Max realtime priority", "Max realtime timeout",
)


@contextmanager
def proc_errors(pid: int, what: str) -> Iterator[None]:
    """Map a vanished process to NoSuchProcess and a refused access to AccessDenied."""
    try:
        yield
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NoSuchProcess(pid, what) from exc
    except PermissionError as exc:
        raise AccessDenied(pid, what) from exc


def proc_path(root: str, pid: int, *names: str) -> str:
    return os.path.join(root, str(pid), *names)


def _read_bytes(pid: int, root: str, *names: str) -> bytes:
    what = "/".join(names)
    with proc_errors(pid, what), open(proc_path(root, pid, *names), "rb") as f:
        return f.read()


def read_text(pid: int, root: str, *names: str) -> str:
    return _read_bytes(pid, root, *names).decode("utf-8", "surrogateescape")


def _readlink(pid: int, root: str, name: str) -> str:
    """Target of a /proc/PID link, "" when it has none (kernel thread, zombie)."""
    path = proc_path(root, pid, name)
    with proc_errors(pid, name):
        try:
            return os.readlink(path)
        except FileNotFoundError:
            # The link itself exists but points nowhere: a kernel thread's or zombie's exe.
            os.lstat(path)
            return ""



@dataclass(frozen=True)
class Stat:
    """Fields of /proc/PID/stat, named as in proc(5)."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int
    tpgid: int
    flags: int
    num_threads: int
    starttime: int
    start_code: int
    end_code: int
    start_stack: int
    exit_signal: int
    processor: int  # the CPU it last ran on
    start_data: int
    end_data: int
    start_brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    exit_code: int


def parse_stat(text: str) -> Stat:
    """Parse a /proc/PID/stat line; comm is between the first '(' and the LAST ')'."""
    head, _, tail = text.rpartition(")")
    pid_s, _, comm = head.partition(" (")
    f = tail.split()  # f[0] is field 3 (state): field N of proc(5) is f[N - 3]

    def n(field: int) -> int:
        return int(f[field - 3]) if len(f) > field - 3 else 0

    return Stat(
        pid=int(pid_s), comm=comm, state=f[0], ppid=n(4), pgrp=n(5), session=n(6),
        tty_nr=n(7), tpgid=n(8), flags=n(9), num_threads=n(20), starttime=n(22),
        start_code=n(26), end_code=n(27), start_stack=n(28), exit_signal=n(38),
        processor=n(39), start_data=n(45), end_data=n(46), start_brk=n(47), arg_start=n(48),
        arg_end=n(49), env_start=n(50), env_end=n(51), exit_code=n(52),
    )


def read_stat(pid: int, *, root: str = "/proc") -> Stat:
    """Parse /proc/PID/stat."""
    text = read_text(pid, root, "stat")
    if not text.strip():
        raise NoSuchProcess(pid, "empty stat")
    return parse_stat(text)



@dataclass(frozen=True)
class Status:
    """Fields of /proc/PID/status.  ``name`` is kernel-escaped ("\\n" for a newline)."""

    name: str
    umask: int | None  # absent on kernels older than 4.7
    state: str  # the letter: "R", "S", "D", "T", "t", "Z", ...
    tgid: int
    pid: int
    ppid: int
    uid: tuple[int, ...]  # real, effective, saved, filesystem
    gid: tuple[int, ...]
    groups: tuple[int, ...]
    nspid: tuple[int, ...]  # pid in each nested pid namespace, outermost first
    threads: int
    sigpnd: int
    shdpnd: int
    sigblk: int
    sigign: int
    sigcgt: int
    nonewprivs: int | None
    seccomp: int | None  # 0 disabled, 1 strict, 2 filter
    tracer: int = 0  # TracerPid: the tracing task, 0 if none


def parse_status(text: str) -> Status:
    """Parse the "Key:\\tvalue" lines of /proc/PID/status."""
    kv: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            kv[key] = value.strip()

    def ints(key: str) -> tuple[int, ...]:
        return tuple(int(v) for v in kv.get(key, "").split())

    def hexint(key: str) -> int:
        return int(kv.get(key) or "0", 16)

    def opt(key: str, base: int = 10) -> int | None:
        return int(kv[key], base) if key in kv else None

    return Status(
        name=kv.get("Name", ""), umask=opt("Umask", 8), state=kv.get("State", "?")[:1],
        tgid=int(kv["Tgid"]), pid=int(kv["Pid"]), ppid=int(kv["PPid"]),
        uid=ints("Uid"), gid=ints("Gid"), groups=ints("Groups"), nspid=ints("NSpid"),
        threads=int(kv.get("Threads", "1")),
        sigpnd=hexint("SigPnd"), shdpnd=hexint("ShdPnd"), sigblk=hexint("SigBlk"),
        sigign=hexint("SigIgn"), sigcgt=hexint("SigCgt"),
        nonewprivs=opt("NoNewPrivs"), seccomp=opt("Seccomp"), tracer=int(kv.get("TracerPid", 0)),
    )


def read_status(pid: int, *, root: str = "/proc") -> Status:
    """Parse /proc/PID/status."""
    text = read_text(pid, root, "status")
    if not text.strip():
        raise NoSuchProcess(pid, "empty status")
    return parse_status(text)



def id_holder(tid: int, *, root: str = "/proc") -> tuple[int, str] | None:
    """Who holds pid/tid ``tid`` now: (its process's pid, that in words, e.g. "process
    812 (sleep)" or "thread 813 of process 812 (python3)"), or None if no task has it."""
    try:
        st = read_status(tid, root=root)
    except (NoSuchProcess, KeyError, ValueError):
        return None
    except AccessDenied:
        return -1, f"task {tid} (its /proc status is unreadable)"
    zombie = ", a zombie not reaped yet" if st.state == "Z" else ""
    if st.tgid == tid:
        return tid, f"process {tid} ({st.name}{zombie})"
    return st.tgid, f"thread {tid} of process {st.tgid} ({st.name}{zombie})"


def read_auxv(pid: int, *, root: str = "/proc") -> bytes:
    """Raw /proc/PID/auxv: (a_type, a_val) pairs of native u64, ending with AT_NULL."""
    return _read_bytes(pid, root, "auxv")


def read_exe(pid: int, *, root: str = "/proc") -> str:
    """Target of /proc/PID/exe ("" for a kernel thread or zombie)."""
    return _readlink(pid, root, "exe")


def read_cwd(pid: int, *, root: str = "/proc") -> str:
    """Target of /proc/PID/cwd ("" when it cannot be resolved, e.g. a zombie)."""
    return _readlink(pid, root, "cwd")


def read_task_cwd(pid: int, tid: int, *, root: str = "/proc") -> str:
    """Target of /proc/PID/task/TID/cwd: a thread's own after unshare(CLONE_FS)."""
    return _readlink(pid, root, os.path.join("task", str(tid), "cwd"))


def read_root(pid: int, *, root: str = "/proc") -> str:
    """Target of /proc/PID/root: "/" unless the process is chrooted."""
    return _readlink(pid, root, "root")


def read_ns(pid: int, name: str, *, root: str = "/proc") -> str:
    """Target of /proc/PID/ns/NAME, e.g. "mnt:[4026531841]" for ``name`` "mnt"."""
    return _readlink(pid, root, os.path.join("ns", name))


def read_comm(pid: int, *, root: str = "/proc") -> str:
    """/proc/PID/comm without its trailing newline (may contain spaces and parentheses)."""
    text = read_text(pid, root, "comm")
    return text[:-1] if text.endswith("\n") else text


def read_cmdline(pid: int, *, root: str = "/proc") -> bytes:
    """Raw /proc/PID/cmdline: NUL-separated argv (empty for kernel threads and zombies)."""
    return _read_bytes(pid, root, "cmdline")


def list_tasks(pid: int, *, root: str = "/proc") -> list[int]:
    """Sorted thread ids from /proc/PID/task."""
    with proc_errors(pid, "task"):
        return sorted(int(name) for name in os.listdir(proc_path(root, pid, "task"))
                      if name.isdigit())


def list_children(pid: int, *, root: str = "/proc") -> list[int]:
    """Sorted child pids, from /proc/PID/task/*/children.

    Without CONFIG_PROC_CHILDREN those files do not exist; then every /proc/N/stat is
    scanned for ppid == pid.
    """
    kids: set[int] = set()
    for tid in list_tasks(pid, root=root):
        try:
            text = read_text(pid, root, "task", str(tid), "children")
        except NoSuchProcess:
            if not os.path.exists(proc_path(root, pid, "task", str(tid))):
                continue  # the thread exited meanwhile
            if not os.path.exists(proc_path(root, pid)):
                raise
            return _children_by_scan(pid, root)
        kids.update(int(v) for v in text.split())
    return sorted(kids)


def _children_by_scan(pid: int, root: str) -> list[int]:
    kids = []
    for name in filter(str.isdigit, os.listdir(root)):
        try:
            if read_stat(int(name), root=root).ppid == pid:
                kids.append(int(name))
        except (NoSuchProcess, AccessDenied):
            continue
    return sorted(kids)


@dataclass(frozen=True)
class Rlimit:
    """One row of /proc/PID/limits; ``unlimited`` is RLIM_INFINITY."""

    resource: int  # RLIMIT_* number
    soft: int
    hard: int


def parse_limits(text: str) -> list[Rlimit]:
    """Parse /proc/PID/limits, ordered by resource number."""
    out = []
    for line in text.splitlines():
        for res, title in enumerate(LIMIT_NAMES):
            if line.startswith(title + " "):
                soft, hard = line[len(title):].split()[:2]
                out.append(Rlimit(res, _limit(soft), _limit(hard)))
                break
    return sorted(out, key=lambda r: r.resource)


def _limit(value: str) -> int:
    return RLIM_INFINITY if value == "unlimited" else int(value)


def read_limits(pid: int, *, root: str = "/proc") -> list[Rlimit]:
    """Parse /proc/PID/limits."""
    return parse_limits(read_text(pid, root, "limits"))


def is_kernel_thread(pid: int, *, root: str = "/proc") -> bool:
    """True for kthreadd and its children (PF_KTHREAD in the stat flags)."""
    st = read_stat(pid, root=root)
    return bool(st.flags & PF_KTHREAD) or pid == KTHREADD_PID or st.ppid == KTHREADD_PID


def pid_exists(pid: int, *, root: str = "/proc") -> bool:
    """True if ``pid`` is a process (a thread-group leader), zombies included.

    /proc/TID also resolves for non-leader threads, hence the Tgid check.
    """
    if pid <= 0:
        return False
    try:
        return read_status(pid, root=root).tgid == pid
    except NoSuchProcess:
        return False
    except AccessDenied:
        return True


def parse_mem_available(text: str) -> int:
    """MemAvailable of /proc/meminfo, in bytes (0 if the line is missing)."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def mem_available(*, root: str = "/proc") -> int:
    try:
        with open(f"{root}/meminfo") as f:
            return parse_mem_available(f.read())
    except OSError:
        return 0
