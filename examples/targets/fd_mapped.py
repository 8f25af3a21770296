"""Mapped memfds and deleted files, each with state in flight (see fdkit for the protocol).

usage: fd_mapped.py CONTROL MODE DIR

  memfd    "both": 2 pages mapped MAP_SHARED read-write, its fd kept open; "only": a page
           mapped MAP_SHARED, its fd closed; "future": mapped MAP_SHARED read-write, then
           sealed F_SEAL_FUTURE_WRITE (the mapping still writes, no write(2) does), fd
           closed; "sealed": sealed F_SEAL_WRITE, then mapped MAP_SHARED read-only, fd open.
           Each check writes a byte through the fd and reads it through the mapping and
           the other way round, writes through "only" and "future", and tries the sealed
           ways.
  deleted  DIR/shared.bin mapped MAP_SHARED read-write, DIR/private.bin (3 pages) mapped
           MAP_PRIVATE read-write with its first page written (copied on write), both
           unlinked and their fds closed; DIR/open.bin mapped MAP_SHARED, unlinked, its fd
           kept open. Each check writes through the shared mappings and the fd, and reads
           the files through /proc/self/map_files.
  dropped  a memfd mapped MAP_SHARED with its fd open and DIR/dropped.bin (mode 0600,
           root's) mapped MAP_SHARED, unlinked, fd closed; working directory DIR/cwd (0700,
           root's), removed; then the process becomes uid 65534. Each check writes through
           the memfd's fd and reads both mappings.
  cwd      working directory DIR/gone (mode 0751, owner 65534:65534, fixed times), then
           removed (not a mapping: the other thing that no path reaches). Each check
           looks at "." and ".." and tries to use the directory.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import Any

from fdkit import serve

F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_WRITE, F_SEAL_FUTURE_WRITE = 8, 16
PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_PRIVATE = 1, 2
PAGE = 4096

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]

State = dict[str, Any]


def mmap(fd: int, length: int, prot: int, flags: int) -> int:
    addr = libc.mmap(None, length, prot, flags, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(addr)


def peek(addr: int, n: int) -> bytes:
    return ctypes.string_at(addr, n)


def poke(addr: int, data: bytes) -> None:
    ctypes.memmove(addr, data, len(data))


def region(addr: int) -> dict[str, Any]:
    """Its /proc/self/maps permissions, name, VmFlags, and a read-only file of it."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split(maxsplit=5)
        if "-" in head[0] and int(head[0].split("-")[0], 16) == addr:
            flags = next(x for x in lines[i + 1:] if x.startswith("VmFlags:"))
            return {"perms": head[1], "name": head[5] if len(head) > 5 else "",
                    "vmflags": sorted(flags.split()[1:]), "span": head[0]}
    raise LookupError(f"{addr:#x} not mapped")


def map_file(addr: int, flags: int = os.O_RDONLY) -> int:
    return os.open(f"/proc/self/map_files/{region(addr)['span']}", flags)


def file_size(addr: int) -> int:
    fd = map_file(addr)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def attempt(call: Any) -> str:
    try:
        call()
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    return "ok"


def setup(args: list[str]) -> State:
    mode, where = args[0], args[1]
    if mode == "memfd":
        both = os.memfd_create("ckpt both", os.MFD_CLOEXEC)
        os.ftruncate(both, 2 * PAGE)
        os.pwrite(both, b"both: written through the fd", 0)
        both_at = mmap(both, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED)
        poke(both_at + PAGE, b"both: written through the mapping")
        only = os.memfd_create("ckpt only", 0)
        os.write(only, b"only mapped".ljust(PAGE, b"-"))
        only_at = mmap(only, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED)
        os.close(only)
        future = os.memfd_create("ckpt future", os.MFD_ALLOW_SEALING)
        os.ftruncate(future, PAGE)
        future_at = mmap(future, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED)
        fcntl.fcntl(future, F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
        os.close(future)
        sealed = os.memfd_create("ckpt sealed", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.write(sealed, b"sealed".ljust(PAGE, b"s"))
        fcntl.fcntl(sealed, F_ADD_SEALS, F_SEAL_WRITE)
        sealed_at = mmap(sealed, PAGE, PROT_READ, MAP_SHARED)
        return {"mode": mode, "n": 0, "both": both, "both_at": both_at, "only_at": only_at,
                "future_at": future_at, "sealed": sealed, "sealed_at": sealed_at}
    if mode == "cwd":
        path = os.path.join(where, "gone")
        os.mkdir(path)
        os.chmod(path, 0o751)
        os.chown(path, 65534, 65534)
        os.utime(path, ns=(1_000_000_000_123, 2_000_000_000_456))
        os.chdir(path)
        os.rmdir(path)
        return {"mode": mode, "n": 0, "parent": os.stat(where).st_ino}
    if mode == "dropped":
        memfd = os.memfd_create("ckpt dropped", os.MFD_CLOEXEC)
        os.ftruncate(memfd, PAGE)
        memfd_at = mmap(memfd, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED)
        path = os.path.join(where, "dropped.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, b"root's file".ljust(PAGE, b"r"))
        file_at = mmap(fd, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED)
        os.close(fd)
        os.unlink(path)
        os.mkdir(os.path.join(where, "cwd"), 0o700)  # root's, entered, removed
        os.chdir(os.path.join(where, "cwd"))
        os.rmdir(os.path.join(where, "cwd"))
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        return {"mode": mode, "n": 0, "memfd": memfd, "memfd_at": memfd_at,
                "file_at": file_at}
    shared_path, private_path = (os.path.join(where, n) for n in ("shared.bin",
                                                                   "private.bin"))
    fd = os.open(shared_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
    os.write(fd, b"shared file".ljust(2 * PAGE, b"="))
    shared_at = mmap(fd, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED)
    os.close(fd)
    os.unlink(shared_path)
    fd = os.open(private_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    for i in range(3):
        os.write(fd, f"file page {i}".encode().ljust(PAGE, b"."))
    private_at = mmap(fd, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE)
    os.close(fd)
    os.unlink(private_path)
    poke(private_at, b"copied on write")
    path = os.path.join(where, "open.bin")
    kept = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(kept, PAGE)
    kept_at = mmap(kept, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED)
    os.unlink(path)
    return {"mode": mode, "n": 0, "shared_at": shared_at, "private_at": private_at,
            "kept": kept, "kept_at": kept_at}


def check(s: State) -> dict[str, Any]:
    s["n"] += 1
    mark = f"#{s['n']}".encode()
    if s["mode"] == "cwd":
        st = os.stat(".")
        return {"stat": [oct(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns,
                         st.st_mtime_ns, st.st_nlink],
                "link": os.readlink("/proc/self/cwd"),
                "getcwd": attempt(os.getcwd), "list": os.listdir("."),
                "create": attempt(lambda: os.open("f", os.O_CREAT | os.O_WRONLY, 0o600)),
                "parent": os.stat("..").st_ino == s["parent"]}
    if s["mode"] == "dropped":
        os.pwrite(s["memfd"], mark, 0)
        return {"uid": os.getuid(), "memfd": peek(s["memfd_at"], len(mark)).decode(),
                "file": peek(s["file_at"], 11).decode(),
                "cwd": os.readlink("/proc/self/cwd").endswith("/cwd (deleted)")}
    return check_memfd(s, mark) if s["mode"] == "memfd" else check_deleted(s, mark)


def check_memfd(s: State, mark: bytes) -> dict[str, Any]:
    both, at = s["both"], s["both_at"]
    os.pwrite(both, b"fd" + mark, 100)
    poke(at + PAGE + 100, b"map" + mark)
    fd_to_map = peek(at + 100, 2 + len(mark)) == b"fd" + mark
    map_to_fd = os.pread(both, 3 + len(mark), PAGE + 100) == b"map" + mark
    view = map_file(at)
    try:
        same_inode = os.fstat(view).st_ino == os.fstat(both).st_ino
    finally:
        os.close(view)
    poke(s["only_at"] + 200, b"only" + mark)
    poke(s["future_at"] + 300, b"future" + mark)
    future = map_file(s["future_at"], os.O_RDWR)
    try:
        future_seals = fcntl.fcntl(future, F_GET_SEALS)
        future_write = attempt(lambda: os.pwrite(future, b"x", 0))
        future_reads = os.pread(future, 6 + len(mark), 300).decode()
    finally:
        os.close(future)
    sealed = s["sealed"]
    return {
        "fd_to_map": fd_to_map, "map_to_fd": map_to_fd, "same_inode": same_inode,
        "both": peek(at, 40).rstrip(b"\0").decode(),
        "both_2": peek(at + PAGE, 40).rstrip(b"\0").decode(),
        "only": peek(s["only_at"], 20).decode(), "only_size": file_size(s["only_at"]),
        "future_seals": future_seals, "future_write": future_write,
        "future_reads": future_reads,
        "sealed_seals": fcntl.fcntl(sealed, F_GET_SEALS),
        "sealed_write": attempt(lambda: os.pwrite(sealed, b"x", 0)),
        "sealed_map_write": attempt(lambda: mmap(sealed, PAGE, PROT_READ | PROT_WRITE,
                                                 MAP_SHARED)),
        "sealed_reads": peek(s["sealed_at"], 8).decode(),
        "regions": [region(s[k]) | {"span": ""} for k in ("both_at", "only_at", "future_at",
                                                           "sealed_at")],
    }


def check_deleted(s: State, mark: bytes) -> dict[str, Any]:
    shared, private = s["shared_at"], s["private_at"]
    poke(shared + PAGE + 10, b"through the mapping" + mark)
    fd = map_file(shared)
    try:
        st = os.fstat(fd)
        shared_file = os.pread(fd, 19 + len(mark), PAGE + 10).decode()
        shared_head = os.pread(fd, 11, 0).decode()
    finally:
        os.close(fd)
    fd = map_file(private)
    try:
        private_file = [os.pread(fd, 15, i * PAGE).decode() for i in range(3)]
    finally:
        os.close(fd)
    regions = [region(a) for a in (shared, private)]
    kept, kept_at = s["kept"], s["kept_at"]
    os.pwrite(kept, b"fd" + mark, 0)
    poke(kept_at + 100, b"map" + mark)
    return {
        "kept_fd_to_map": peek(kept_at, 2 + len(mark)) == b"fd" + mark,
        "kept_map_to_fd": os.pread(kept, 3 + len(mark), 100) == b"map" + mark,
        "kept_deleted": os.readlink(f"/proc/self/fd/{kept}").endswith(" (deleted)"),
        "shared_file": shared_file, "shared_head": shared_head,
        "shared_map": peek(shared + PAGE + 10, 19 + len(mark)).decode(),
        "shared_nlink": st.st_nlink, "shared_mode": oct(st.st_mode),
        "private_map": [peek(private + i * PAGE, 15).decode() for i in range(3)],
        "private_file": private_file,
        "deleted": [r["name"].endswith(" (deleted)") for r in regions],
        "regions": [{"perms": r["perms"], "vmflags": r["vmflags"]} for r in regions],
    }


if __name__ == "__main__":
    serve(setup, check)
