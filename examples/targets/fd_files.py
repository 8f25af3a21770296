"""Files that are not plain paths: memfds, deleted files still open, directories, O_PATH
fds and stateless devices, each with state in flight (see fdkit for the protocol).

usage: fd_files.py CONTROL MODE DIR [SIZE]

  memfd   "ckpt sealed": 5000 bytes, sealed against writes, growing, shrinking and
          further seals; "ckpt open": a page of text, a hole, a tail, position 7, on a
          non-cloexec fd, and a second open file of it (O_RDONLY through /proc/self/fd)
          at position 3. Each check appends one byte through the first, reads it back
          through the second, and tries to write the sealed one.
  ghost   DIR/gone.txt (SIZE bytes, default 3000, mode 0640): one O_RDWR open file at
          position 5, one O_RDONLY at position 2, one O_WRONLY|O_APPEND, then the file is
          unlinked. Each check reads 4 bytes from the first two, appends one through the
          first.
  dirs    DIR/d with 40 entries, read a few at a time with getdents64, an O_PATH
          fd on DIR/d and one on DIR/d/f0, /dev/urandom, /dev/random (O_NONBLOCK), /dev/zero,
          /dev/full. Each
          check reads the next entries and uses every fd.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import struct

from fdkit import serve

F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8
NR_GETDENTS64 = 217
PAGE = 4096
NOBODY = 65534  # the owner given to a memfd and the deleted file (the target runs as root)

State = dict[str, int]
_libc = ctypes.CDLL(None, use_errno=True)


def setup(args: list[str]) -> State:
    mode, where = args[0], args[1]
    if mode == "memfd":
        sealed = os.memfd_create("ckpt sealed", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.write(sealed, bytes(range(256)) * 19 + b"x" * 136)
        fcntl.fcntl(sealed, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK
                    | F_SEAL_SEAL)
        opened = os.memfd_create("ckpt open", 0)  # not cloexec
        os.fchown(opened, NOBODY, NOBODY)
        os.write(opened, b"first page".ljust(PAGE, b"."))
        os.pwrite(opened, b"tail", 3 * PAGE)  # a hole in between
        os.lseek(opened, 7, os.SEEK_SET)
        second = os.open(f"/proc/self/fd/{opened}", os.O_RDONLY)
        os.lseek(second, 3, os.SEEK_SET)
        return {"sealed": sealed, "open": opened, "second": second}
    if mode == "ghost":
        size = int(args[2]) if len(args) > 2 else 3000
        path = os.path.join(where, "gone.txt")
        rw = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
        os.fchmod(rw, 0o640)
        os.fchown(rw, NOBODY, NOBODY)
        os.write(rw, (b"0123456789abcdef" * (size // 16 + 1))[:size])
        os.lseek(rw, 5, os.SEEK_SET)
        ro = os.open(path, os.O_RDONLY)
        os.lseek(ro, 2, os.SEEK_SET)
        wo = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.unlink(path)
        return {"rw": rw, "ro": ro, "wo": wo}
    if mode == "dirs":
        d = os.path.join(where, "d")
        os.mkdir(d)
        for i in range(40):
            with open(os.path.join(d, f"f{i}"), "w") as f:
                f.write(f"file {i}\n")
        dirfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        state = {"dir": dirfd, "dir_path": os.open(d, os.O_PATH | os.O_DIRECTORY),
                 "file_path": os.open(os.path.join(d, "f0"), os.O_PATH),
                 "urandom": os.open("/dev/urandom", os.O_RDONLY),
                 "random": os.open("/dev/random", os.O_RDONLY | os.O_NONBLOCK),
                 "zero": os.open("/dev/zero", os.O_RDONLY),
                 "full": os.open("/dev/full", os.O_WRONLY)}
        return state
    raise SystemExit(f"unknown mode {mode}")


def getdents(fd: int) -> list[str]:
    """One getdents64 call with room for a few entries."""
    buf = ctypes.create_string_buffer(160)
    n = _libc.syscall(ctypes.c_long(NR_GETDENTS64), ctypes.c_long(fd), buf,
                      ctypes.c_long(len(buf)))
    if n < 0:
        raise OSError(ctypes.get_errno(), "getdents64")
    names, off = [], 0
    while off < n:
        reclen = struct.unpack_from("<H", buf.raw, off + 16)[0]
        names.append(buf.raw[off + 19:off + reclen].split(b"\0", 1)[0].decode())
        off += reclen
    return names


def fdinfo_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))


def errname(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def digest(fd: int) -> str:
    size = os.fstat(fd).st_size
    return hashlib.sha256(os.pread(fd, size, 0)).hexdigest()[:16]


def check(s: State) -> dict[str, object]:
    if "sealed" in s:
        sealed, opened, second = s["sealed"], s["open"], s["second"]
        sealed_mtime = os.fstat(sealed).st_mtime_ns  # a refused write still sets it
        os.write(opened, b"+")
        st = os.fstat(opened)
        return {
            "names": [os.readlink(f"/proc/self/fd/{fd}") for fd in (sealed, opened)],
            "seals": fcntl.fcntl(sealed, F_GET_SEALS), "sealed": digest(sealed),
            "sealed_size": os.fstat(sealed).st_size,
            "write_sealed": errname(lambda: os.pwrite(sealed, b"y", 0)),
            "grow_sealed": errname(lambda: os.ftruncate(sealed, 2 * PAGE)),
            "open_seals": fcntl.fcntl(opened, F_GET_SEALS),
            "open_pos": os.lseek(opened, 0, os.SEEK_CUR), "open_size": st.st_size,
            "open": digest(opened), "second_reads": os.read(second, 6).decode(),
            "second_sees": os.pread(second, 1, os.lseek(opened, 0, os.SEEK_CUR) - 1).decode(),
            "same_inode": os.fstat(second).st_ino == st.st_ino, "mode": oct(st.st_mode),
            "owner": [st.st_uid, st.st_gid],
            "sealed_mtime": [sealed_mtime, os.fstat(sealed).st_mtime_ns],
            "cloexec": [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                        for fd in (sealed, opened, second)],
            "second_flags": oct(fdinfo_flags(second) & 0o3),
        }
    if "rw" in s:
        rw, ro = s["rw"], s["ro"]
        got = [os.read(rw, 4).decode(), os.read(ro, 4).decode()]
        os.pwrite(rw, b"!", os.fstat(rw).st_size)
        st = os.fstat(rw)
        return {
            "read": got, "pos": [os.lseek(fd, 0, os.SEEK_CUR) for fd in (rw, ro)],
            "size": st.st_size, "digest": digest(ro), "mode": oct(st.st_mode),
            "owner": [st.st_uid, st.st_gid],
            "nlink": st.st_nlink, "same_inode": os.fstat(ro).st_ino == st.st_ino,
            "deleted": os.readlink(f"/proc/self/fd/{rw}").endswith(" (deleted)"),
            "flags": [oct(fdinfo_flags(fd) & (0o3 | os.O_APPEND)) for fd in (rw, ro, s["wo"])],
        }
    entries = getdents(s["dir"])
    f1 = os.open("f1", os.O_RDONLY, dir_fd=s["dir"])
    f2 = os.open("f2", os.O_RDONLY, dir_fd=s["dir_path"])
    try:
        relative = [os.read(f1, 20).decode(), os.read(f2, 20).decode()]
    finally:
        os.close(f1)
        os.close(f2)
    return {
        "entries": entries, "relative": relative,
        "o_path": [bool(fdinfo_flags(s[k]) & os.O_PATH) for k in ("dir_path", "file_path")],
        "flags": [oct(fdinfo_flags(s[k])) for k in sorted(s)],
        "read_o_path": errname(lambda: os.read(s["file_path"], 1)),
        "file_path_is": os.readlink(f"/proc/self/fd/{s['file_path']}").rsplit("/", 1)[-1],
        "urandom": len(os.read(s["urandom"], 16)), "random": len(os.read(s["random"], 4)),
        "zero": os.read(s["zero"], 8).hex(),
        "full": errname(lambda: os.write(s["full"], b"x")),
    }


if __name__ == "__main__":
    serve(setup, check)
