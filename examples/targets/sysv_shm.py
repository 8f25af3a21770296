"""System V shared memory: a 3-page segment attached twice (read-write, and read-only),
the read-write attach split by an mprotect of its last page, a counter kept in it.

usage: sysv_shm.py CONTROL private|keyed|locked KEY
    private   IPC_PRIVATE, removed (IPC_RMID) at once: gone with its last detach
    keyed     key KEY (decimal), left in place
    locked    the same, and SHM_LOCKed

Each check adds one to the counter (through the read-write attach) and reports it as
read through the read-only attach, a digest of the whole segment, the segment's id, mode
and owner as IPC_STAT sees them, and the permissions of the attaches in /proc/self/maps.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct

from fdkit import serve

PAGE = 4096
IPC_CREAT, IPC_RMID, IPC_STAT, SHM_RDONLY, SHM_LOCK = 0o1000, 0, 2, 0o10000, 11
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]


def setup(args: list[str]) -> tuple[int, int, int]:
    kind, key = args[0], int(args[1])
    shmid = libc.shmget(0 if kind == "private" else key, 3 * PAGE, IPC_CREAT | 0o640)
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    rw = libc.shmat(shmid, None, 0)
    ro = libc.shmat(shmid, None, SHM_RDONLY)
    assert rw and ro and rw != 2**64 - 1
    ctypes.memmove(rw + PAGE, bytes(range(256)) * 16, PAGE)  # a pattern in page 2
    libc.mprotect(ctypes.c_void_p(rw + 2 * PAGE), PAGE, 1)  # last page read-only
    if kind == "private":
        libc.shmctl(shmid, IPC_RMID, None)
    if kind == "locked":
        assert libc.shmctl(shmid, SHM_LOCK, None) == 0, os.strerror(ctypes.get_errno())
    return shmid, rw, ro


def check(state: tuple[int, int, int]) -> dict[str, object]:
    shmid, rw, ro = state
    counter = struct.unpack("Q", ctypes.string_at(rw, 8))[0] + 1
    ctypes.memmove(rw, struct.pack("Q", counter), 8)
    ds = ctypes.create_string_buffer(112)
    assert libc.shmctl(shmid, IPC_STAT, ds) == 0, os.strerror(ctypes.get_errno())
    _key, uid, gid, _cuid, _cgid, mode = struct.unpack_from("iIIIIH", ds.raw)
    with open("/proc/self/maps") as f:
        maps = sorted(line.split()[1] for line in f if "/SYSV" in line)
    return {"counter": struct.unpack("Q", ctypes.string_at(ro, 8))[0],
            "digest": hashlib.sha256(ctypes.string_at(ro + 8, 3 * PAGE - 8)).hexdigest()[:16],
            "shmid": shmid, "mode": oct(mode), "owner": [uid, gid], "maps": maps}


if __name__ == "__main__":
    serve(setup, check)
