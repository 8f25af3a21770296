"""VMAs with their kind: /proc/PID/maps lines plus smaps VmFlags, classified."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ckpt.collect.maps import MapEntry, read_maps, read_smaps_vmflags


class VmaKind(enum.IntEnum):
    """Same numbering as ``Vma.Kind`` in proto/core.proto."""

    ANON_PRIVATE = 0
    FILE_PRIVATE = 1
    FILE_SHARED = 2
    ANON_SHARED = 3
    STACK = 4
    HEAP = 5
    VDSO = 6
    VVAR = 7
    VVAR_VCLOCK = 8
    VSYSCALL = 9
    SYSV_SHM = 10  # a System V shared memory attach (ckpt.collect.sysvshm)


SPECIAL_KINDS = {"[vdso]": VmaKind.VDSO, "[vvar]": VmaKind.VVAR,
                 "[vvar_vclock]": VmaKind.VVAR_VCLOCK, "[vsyscall]": VmaKind.VSYSCALL}
SHMEM_NAMES = ("/dev/zero (deleted)", "[anon_shmem")
SYSV_NAME = "/SYSV"  # "/SYSV<key in hex> (deleted)"
KERNEL_PROVIDED = frozenset(SPECIAL_KINDS.values())


@dataclass(frozen=True)
class VmaInfo:
    start: int
    end: int
    prot: int
    shared: bool
    kind: VmaKind
    pgoff: int
    path: str
    dev: int
    inode: int
    vmflags: tuple[str, ...]
    pkey: int = 0  # memory protection key (pkey_mprotect), smaps "ProtectionKey:"

    @property
    def length(self) -> int:
        return self.end - self.start


def classify(m: MapEntry, vmflags: tuple[str, ...]) -> VmaKind:
    """The kind of one VMA. Anonymous means no backing inode ([anon:x] names included)."""
    if m.path in SPECIAL_KINDS:
        return SPECIAL_KINDS[m.path]
    if m.shared and m.path.startswith(SYSV_NAME):
        return VmaKind.SYSV_SHM  # inode: the shmid
    if m.shared and (m.inode == 0 or m.path.startswith(SHMEM_NAMES)):
        return VmaKind.ANON_SHARED  # MAP_SHARED|MAP_ANONYMOUS, or a mapping of /dev/zero
    if m.inode == 0:
        if m.path == "[heap]":
            return VmaKind.HEAP
        if m.path == "[stack]" or "gd" in vmflags:
            return VmaKind.STACK
        return VmaKind.ANON_PRIVATE
    return VmaKind.FILE_SHARED if m.shared else VmaKind.FILE_PRIVATE


def collect_vmas(pid: int, root: str = "/proc", vmflags: bool = True,
                 known: list[VmaInfo] | None = None) -> list[VmaInfo]:
    """VMAs of ``pid``. smaps, the only source of VmFlags, walks every page table: with
    ``vmflags=False`` only /proc/PID/maps is read (kinds that need flags, like a
    growsdown VMA other than [stack], are then not told apart); with ``known`` (read
    earlier), smaps is read again only if some VMA is not among them, unchanged."""
    maps = read_maps(pid, root=root)
    flags: dict[int, tuple[str, ...]] = {}
    pkeys: dict[int, int] = {}
    if known is not None:
        seen = {_key(v): v for v in known}
        if all(_key(m) in seen for m in maps):
            flags = {m.start: seen[_key(m)].vmflags for m in maps}
            pkeys = {m.start: seen[_key(m)].pkey for m in maps}
        else:
            known = None
    if vmflags and known is None:
        flags = read_smaps_vmflags(pid, root=root, pkeys=pkeys)
    out = []
    for m in maps:
        vf = tuple(flags.get(m.start, ()))
        out.append(VmaInfo(start=m.start, end=m.end, prot=m.prot, shared=m.shared,
                           kind=classify(m, vf), pgoff=m.offset, path=m.path, dev=m.dev,
                           inode=m.inode, vmflags=vf, pkey=pkeys.get(m.start, 0)))
    return out


def _key(v: MapEntry | VmaInfo) -> tuple[int, int, int, bool, int, int, str]:
    offset = v.offset if isinstance(v, MapEntry) else v.pgoff
    return (v.start, v.end, v.prot, v.shared, v.inode, offset, v.path)
