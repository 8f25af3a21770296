"""System V shared memory (shmget/shmat): the segments a process attaches, saved whole and
attached again at the same addresses, collector and restorer side by side.

A segment lives in the IPC namespace, not in the process: /proc/sysvipc/shm lists it
(ckpt's namespace, which must be the target's), /proc/PID/maps shows each attach as

    7f2217000000-7f2217003000 rw-s 00000000 00:01 26    /SYSV00001234 (deleted)
                                   offset      shmid=inode  key in hex

Dump: every attached segment's ids, mode and whole contents (read through ckpt's own
read-only attach) go in the core image; its VMAs are kind SYSV_SHM and carry no pages.
Restore: a segment still there with the same id, key and size (a restore on the same
host) is reused, otherwise made again under the same id (kernel.shm_next_id); either way
its contents become the dump's. The process then attaches it where it was (one shmat per
attach, read-only or executable as the VMAs' VM_MAYWRITE / VM_MAYEXEC say), and a segment
that was removed (IPC_RMID) is removed again, to vanish with its last detach.

Refused before the freeze (:func:`refusals`): a segment another process attaches too
(process trees), an attach the process partly unmapped, huge-page segments, segments
larger than :data:`MAX_SEGMENT`, and a target in another IPC namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import zstandard

from ckpt.collect.fdkinds.base import Remote
from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.creds import call_as_creator
from ckpt.kernel.sys import NR, PAGE_SIZE, syscall

SHM_DEST = 0o1000  # in /proc/sysvipc/shm perms: removed, destroyed at the last detach
SHM_LOCKED = 0o2000  # ... and SHM_LOCK: its pages stay in memory
SHM_LOCK = 11
SHM_RDONLY, SHM_EXEC = 0o10000, 0o100000
IPC_CREAT, IPC_EXCL, IPC_RMID, IPC_SET, IPC_STAT = 0o1000, 0o2000, 0, 1, 2
IPC_PRIVATE = 0
MAX_SEGMENT = 1 << 30  # bytes: a larger segment is refused (it goes in the core image)
NEXT_ID = "/proc/sys/kernel/shm_next_id"


@dataclass(frozen=True)
class Segment:
    """One line of /proc/sysvipc/shm."""

    key: int
    shmid: int
    mode: int  # perms as shown: permission bits, SHM_DEST, SHM_LOCKED
    size: int
    nattch: int
    uid: int
    gid: int
    cuid: int = 0
    cgid: int = 0

    @property
    def removed(self) -> bool:
        return bool(self.mode & SHM_DEST)

    @property
    def locked(self) -> bool:
        return bool(self.mode & SHM_LOCKED)


def parse_sysvipc_shm(text: str) -> dict[int, Segment]:
    """/proc/sysvipc/shm by shmid (key, shmid, perms (octal), size, cpid, lpid, nattch,
    uid, gid, cuid, cgid, ...)."""
    out = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 9:
            continue
        seg = Segment(key=int(f[0]), shmid=int(f[1]), mode=int(f[2], 8), size=int(f[3]),
                      nattch=int(f[6]), uid=int(f[7]), gid=int(f[8]),
                      cuid=int(f[9]) if len(f) > 10 else 0,
                      cgid=int(f[10]) if len(f) > 10 else 0)
        out[seg.shmid] = seg
    return out


def read_segments(root: str = "/proc") -> dict[int, Segment]:
    try:
        with open(f"{root}/sysvipc/shm") as f:
            return parse_sysvipc_shm(f.read())
    except FileNotFoundError:
        return {}


@dataclass(frozen=True)
class Attach:
    """One shmat of segment ``shmid`` at ``base``: the VMAs it became (mprotect splits
    one attach into several)."""

    shmid: int
    base: int
    vmas: tuple[VmaInfo, ...]

    @property
    def end(self) -> int:
        return self.vmas[-1].end


def attaches(vmas: Sequence[VmaInfo]) -> list[Attach]:
    """Group the SYSV_SHM VMAs by attach: adjacent, same segment, same base address."""
    out: list[Attach] = []
    for v in sorted((v for v in vmas if v.kind == VmaKind.SYSV_SHM), key=lambda v: v.start):
        base = v.start - v.pgoff
        last = out[-1] if out else None
        if last and last.shmid == v.inode and last.base == base and last.end == v.start:
            out[-1] = Attach(last.shmid, base, (*last.vmas, v))
        else:
            out.append(Attach(v.inode, base, (v,)))
    return out


def refusals(pid: int, vmas: Sequence[VmaInfo], segments: dict[int, Segment],
             same_ipc_ns: bool, migrating: bool = False,
             members: Mapping[int, int] | None = None) -> list[str]:
    """Why the SysV attaches of ``pid`` could not be restored exactly (pure); a migration
    (whose destination maps memory pass by pass, without shmat) takes none. In a tree
    dump, ``members``: the other members' attaches (VMAs) by shmid, theirs too."""
    found = attaches(vmas)
    if found and migrating:
        a = found[0]
        return [f"process {pid} attaches System V shared memory ({a.shmid} at "
                f"{a.base:#x}): ckpt dump and restore carry it, migrate does not yet"]
    if found and not same_ipc_ns:
        return [f"process {pid} attaches System V shared memory in another IPC namespace "
                "than ckpt's: not supported yet"]
    out = []
    count: dict[int, int] = {}
    for a in found:  # nattch counts VMAs: an mprotect split opens the segment again
        count[a.shmid] = count.get(a.shmid, 0) + len(a.vmas)
    for a in found:
        seg = segments.get(a.shmid)
        where = f"System V shared memory {a.shmid} at {a.base:#x}"
        if seg is None:
            out.append(f"process {pid} attaches {where}, which /proc/sysvipc/shm does not "
                       "list (huge pages, or gone): not supported yet")
        elif a.end - a.base != _pages(seg.size) or a.vmas[0].pgoff != 0:
            out.append(f"process {pid} attaches {where} in part (unmapped inside): "
                       "not supported yet")
        elif seg.size > MAX_SEGMENT:
            out.append(f"process {pid} attaches {where} of {seg.size} bytes, more than "
                       f"ckpt saves ({MAX_SEGMENT} bytes)")
    for shmid, mine in sorted(count.items()):
        seg = segments.get(shmid)
        ours = mine + (members or {}).get(shmid, 0)
        if seg is not None and seg.nattch > ours:
            out.append(f"process {pid}'s System V shared memory {shmid} is also attached "
                       f"by {seg.nattch - ours} process(es) outside the dump: a restore "
                       "would cut them off")
    return out


def member_attaches(pids: Iterable[int], root: str = "/proc") -> dict[int, int]:
    """VMAs of System V shared memory the processes ``pids`` map, by shmid (the inode
    of a "/SYSV<key> (deleted)" line of /proc/PID/maps); a process gone is skipped."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            with open(f"{root}/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
                lines = f.readlines()
        except OSError:
            continue
        for line in lines:
            words = line.split(maxsplit=5)
            if len(words) == 6 and words[5].startswith("/SYSV"):
                out[int(words[4])] = out.get(int(words[4]), 0) + 1
    return out


def _pages(size: int) -> int:
    return -(-size // PAGE_SIZE) * PAGE_SIZE


# --------------------------------------------------------------------------- dump


@contextlib.contextmanager
def _attached(shmid: int, flags: int) -> Iterator[int]:
    addr = syscall(NR.shmat, shmid, 0, flags, what=f"shmat({shmid})")
    try:
        yield addr
    finally:
        syscall(NR.shmdt, addr, what="shmdt")


def collect_segments(vmas: Sequence[VmaInfo], root: str = "/proc") -> list[pb.SysvShm]:
    """Every segment the VMAs attach, with its contents (call it while frozen)."""
    segments = read_segments(root)
    out = []
    for shmid in sorted({a.shmid for a in attaches(vmas)}):
        seg = segments[shmid]
        with _attached(shmid, SHM_RDONLY) as addr:
            data = ctypes.string_at(addr, seg.size)
        out.append(pb.SysvShm(key=seg.key, shmid=shmid, mode=seg.mode & 0o777, size=seg.size,
                              uid=seg.uid, gid=seg.gid, removed=seg.removed,
                              locked=seg.locked, cuid=seg.cuid, cgid=seg.cgid,
                              data=zstandard.ZstdCompressor(level=1).compress(data)))
    return out


# --------------------------------------------------------------------------- restore


def restore_segments(entry: pb.ProcessEntry, done: set[int] | None = None) -> list[int]:
    """Make (or find) every segment of the image under its id, with its contents and
    owner; return the ids of those made here (for :func:`forget` if the restore fails).
    ``done``: a tree's segments an earlier member made (or found) already, updated."""
    made = []
    here = read_segments()
    done = set() if done is None else done
    try:
        for seg in entry.sysv_shm:
            if seg.shmid in done:
                continue
            done.add(seg.shmid)
            if not _reusable(here.get(seg.shmid), seg):
                _make(seg)
                made.append(seg.shmid)
            _fill(seg)
    except BaseException:
        forget(made)
        raise
    return made


def _reusable(there: Segment | None, seg: pb.SysvShm) -> bool:
    """Is the segment ``there`` under the image's id the dumped one, still in place (a
    restore on the same host)? Only if nothing attaches it (its contents are the
    image's to set) and its key, size, owner, creator and mode are the image's; any
    other segment under that id stops the restore."""
    if there is None:
        return False
    same = (there.key, there.size, there.uid, there.gid, there.cuid, there.cgid,
            there.mode & 0o777, there.locked) == (seg.key, seg.size, seg.uid, seg.gid,
                                                  seg.cuid, seg.cgid, seg.mode, seg.locked)
    if same and not there.removed and there.nattch == 0:
        return True
    why = (f"attached by {there.nattch} process(es)" if same and there.nattch
           else f"key {there.key:#x}, {there.size} bytes, owner {there.uid}:{there.gid}")
    raise RestoreError(f"System V shared memory id {seg.shmid} is taken by another segment "
                       f"or in use ({why})")


def _make(seg: pb.SysvShm) -> None:
    key = IPC_PRIVATE if seg.removed else seg.key
    flags = IPC_CREAT | IPC_EXCL | (seg.mode & 0o777)

    def shmget() -> int:
        return syscall(NR.shmget, key, seg.size, flags,
                       what=f"shmget (System V shared memory {seg.shmid})")

    try:
        with open(NEXT_ID, "w") as f:
            f.write(str(seg.shmid))
        got = call_as_creator(seg.cuid, seg.cgid, shmget)  # its creator is the dumped one
    except OSError as exc:
        raise RestoreError(f"cannot make System V shared memory {seg.shmid} (key "
                           f"{seg.key:#x}) again: {exc.strerror or exc}") from None
    if got != seg.shmid:
        forget([got])
        raise RestoreError(f"System V shared memory {seg.shmid} came back as id {got}")
    ds = ShmidDs()
    syscall(NR.shmctl, got, IPC_STAT, ctypes.addressof(ds), what="shmctl(IPC_STAT)")
    ds.uid, ds.gid, ds.mode = seg.uid, seg.gid, seg.mode & 0o777
    syscall(NR.shmctl, got, IPC_SET, ctypes.addressof(ds), what="shmctl(IPC_SET)")
    if seg.locked:
        syscall(NR.shmctl, got, SHM_LOCK, 0, what="shmctl(SHM_LOCK)")


def contents(seg: pb.SysvShm) -> bytes:
    """The segment's bytes, from the image's zstd frame; RestoreError if it is not one."""
    try:
        data: bytes = zstandard.ZstdDecompressor().decompress(seg.data,
                                                              max_output_size=seg.size)
    except zstandard.ZstdError as exc:
        raise RestoreError(f"System V shared memory {seg.shmid}: its contents in the image "
                           f"are corrupted ({exc})") from None
    if len(data) != seg.size:
        raise RestoreError(f"System V shared memory {seg.shmid}: the image holds "
                           f"{len(data)} bytes of {seg.size}")
    return data


def _fill(seg: pb.SysvShm) -> None:
    data = contents(seg)
    with _attached(seg.shmid, 0) as addr:
        ctypes.memmove(addr, data, len(data))


def attach_segments(remote: Remote, entry: pb.ProcessEntry) -> None:
    """shmat every attach of the image at its address in the restored process, with the
    VMAs' protections; then remove the segments that were removed."""
    for a in attaches([_vma_info(v) for v in entry.vmas if v.kind == pb.Vma.SYSV_SHM]):
        flags = (0 if "mw" in a.vmas[0].vmflags else SHM_RDONLY) | (
            SHM_EXEC if "me" in a.vmas[0].vmflags else 0)
        got = remote.sc(NR.shmat, a.shmid, a.base, flags,
                        what=f"shmat System V shared memory {a.shmid} at {a.base:#x}")
        if got != a.base:
            raise RestoreError(f"System V shared memory {a.shmid} attached at {got:#x}, "
                               f"not {a.base:#x}")
        for v in a.vmas:
            remote.sc(NR.mprotect, v.start, v.end - v.start, v.prot,
                      what=f"mprotect {v.start:#x}")
    for seg in entry.sysv_shm:
        if seg.removed:
            syscall(NR.shmctl, seg.shmid, IPC_RMID, 0, what="shmctl(IPC_RMID)")


def forget(made: list[int]) -> None:
    """Remove segments a failed restore made (they are gone at their last detach)."""
    for shmid in made:
        with contextlib.suppress(OSError):
            syscall(NR.shmctl, shmid, IPC_RMID, 0, what="shmctl(IPC_RMID)")


def _vma_info(v: pb.Vma) -> VmaInfo:
    return VmaInfo(start=v.start, end=v.end, prot=v.prot, shared=v.shared,
                   kind=VmaKind(v.kind), pgoff=v.pgoff, path=v.path, dev=v.dev, inode=v.inode,
                   vmflags=tuple(v.vmflags))


class ShmidDs(ctypes.Structure):
    """struct shmid64_ds (x86-64): struct ipc64_perm, then the segment's fields."""

    _fields_ = [("key", ctypes.c_int32), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("cuid", ctypes.c_uint32), ("cgid", ctypes.c_uint32),
                ("mode", ctypes.c_uint16), ("pad1", ctypes.c_uint16),
                ("seq", ctypes.c_uint16), ("pad2", ctypes.c_uint16),
                ("unused1", ctypes.c_uint64), ("unused2", ctypes.c_uint64),
                ("segsz", ctypes.c_uint64), ("atime", ctypes.c_int64),
                ("dtime", ctypes.c_int64), ("ctime", ctypes.c_int64),
                ("cpid", ctypes.c_int32), ("lpid", ctypes.c_int32),
                ("nattch", ctypes.c_uint64), ("unused4", ctypes.c_uint64),
                ("unused5", ctypes.c_uint64)]


assert ctypes.sizeof(ShmidDs) == 112
