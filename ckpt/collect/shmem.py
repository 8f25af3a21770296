"""Anonymous shared memory (MAP_SHARED|MAP_ANONYMOUS, a MAP_SHARED mapping of /dev/zero)
mapped by several processes: one shmem object, listed in /proc/PID/maps as
"/dev/zero (deleted)" with its inode, inherited across fork().

    dump, before the   inspect: for each such VMA, which processes outside the dump map
    freeze and frozen  the same object (one scan of every /proc/PID/maps per dump, memo)
                       and how the tree's members map it (their maps, read afresh);
                       ckpt.collect.restorable refuses (:func:`refusal`) memory shared
                       with a process outside the dump (a restore would make a copy for
                       this process alone), and an object the owner's mapping does not
                       cover for every other member ("mapped in parts")
    dump, frozen       place: the owner of an object several members map is the first
                       member in pre-order mapping it; every member's Vma records the
                       object (Vma.shmid: its inode), the owner (Vma.shm_owner) and
                       Vma.shm_start; only the owner's pagemap stores its pages (the
                       others' VMAs are left out of their copy plan: :func:`not_owned`)
    restore            the owner maps and fills it as any shared anonymous memory; every
                       other member maps the owner's restored object (ckpt.restore.mm)

shm_start is where offset 0 of the object lies in the owner's address space (its VMA's
start minus its offset), so that an offset of the object is an address of the owner:

    owner  [ VMA A: start 0x7000_0000, pgoff 0 ..................... ]
    child         [ VMA B: pgoff 0x3000 ....... ]
    shm_start = 0x7000_0000; B's pages are the owner's at shm_start + 0x3000

At restore the other member finds the owner's VMA holding shm_start + its pgoff (pids are
the same; the owner is restored first), opens /proc/OWNER/map_files/START-END and mmaps
it MAP_SHARED at its own address and the matching offset of the new object.

Incremental dumps: the owner's dirty tracking (uffd-wp) sees no write made through
another member's mapping, so the owner saves such memory whole every pass (WHOLE).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckpt.collect.holders import scan_maps
from ckpt.collect.maps import parse_maps_line
from ckpt.collect.proc import read_text
from ckpt.collect.vmas import SHMEM_NAMES, VmaInfo, VmaKind
from ckpt.errors import NoSuchProcess

#: a dump's pass stats (DumpStats.whole_vmas): the owner's tracking misses the others' writes
WHOLE = "anonymous shared memory other members map too: saved whole by its owner"
MAPS_MEMO = "shmem.maps"  # Peek-style memo key: every outside process's shmem mappings
Object = tuple[int, int]  # (st_dev, st_ino) of the shmem object


@dataclass(frozen=True)
class ShmMap:
    """One VMA of a shmem object (offsets in bytes)."""

    pid: int
    start: int
    end: int
    pgoff: int
    dev: int
    inode: int

    @property
    def obj(self) -> Object:
        return self.dev, self.inode

    @property
    def last(self) -> int:
        """The object's offset just past this VMA."""
        return self.pgoff + self.end - self.start


@dataclass(frozen=True)
class Seen:
    """What was seen of one VMA's object: processes outside the dump mapping it, the
    members mapping it (but this one), and whether the owner's mapping covers all."""

    outside: tuple[int, ...] = ()
    members: tuple[int, ...] = ()
    covered: bool = True


@dataclass(frozen=True)
class Placement:
    """What a member's Vma records of a shmem object several members map."""

    shmid: int  # the object's inode
    owner: int  # the member whose pagemap holds its pages
    start: int  # where offset 0 of the object lies in the owner (Vma.shm_start)


def is_shmem(v: VmaInfo) -> bool:
    return v.kind == VmaKind.ANON_SHARED and v.inode != 0


def of_vmas(pid: int, vmas: Iterable[VmaInfo]) -> list[ShmMap]:
    return [ShmMap(pid, v.start, v.end, v.pgoff, v.dev, v.inode) for v in vmas if is_shmem(v)]


def read_shmem_maps(pid: int, root: str = "/proc") -> list[ShmMap]:
    """The shmem VMAs of ``pid`` from /proc/PID/maps (none if it is gone). Only their
    lines are parsed: every member's maps are read for every member that has some."""
    try:
        text = read_text(pid, root, "maps")
    except NoSuchProcess:
        return []
    found = (parse_maps_line(line) for line in text.splitlines()
             if any(name in line for name in SHMEM_NAMES))
    return [ShmMap(pid, m.start, m.end, m.offset, m.dev, m.inode) for m in found
            if m.shared and m.inode and m.path.startswith(SHMEM_NAMES)]


# --------------------------------------------------------------------------- pure


def owner_vma(obj: Object, owner: Sequence[ShmMap], lo: int, hi: int) -> ShmMap | None:
    """The owner's VMA of ``obj`` holding the object's bytes [lo, hi), or None. (Each
    VMA of the owner is restored as an object of its own: a range split across two of
    its VMAs has no single one.)"""
    return next((o for o in owner if o.obj == obj and o.pgoff <= lo and hi <= o.last
                 and o.start >= o.pgoff), None)


def _owners(members: Sequence[Sequence[ShmMap]]) -> dict[Object, Sequence[ShmMap]]:
    """Each object mapped by more than one member: the first member's (pre-order) VMAs."""
    first: dict[Object, Sequence[ShmMap]] = {}
    count: dict[Object, set[int]] = {}
    for maps in members:
        for m in maps:
            first.setdefault(m.obj, maps)
            count.setdefault(m.obj, set()).add(m.pid)
    return {obj: maps for obj, maps in first.items() if len(count[obj]) > 1}


def place(members: Sequence[Sequence[ShmMap]]) -> dict[tuple[int, int], Placement]:
    """(pid, VMA start) → what that Vma records, for every VMA of an object that several
    members (``members``: each one's shmem VMAs, in pre-order) map. A VMA the owner does
    not cover is left out (:func:`judge` refuses it)."""
    out = {}
    owners = _owners(members)
    for maps in members:
        for m in maps:
            if m.obj not in owners:
                continue
            o = owner_vma(m.obj, owners[m.obj], m.pgoff, m.last)
            if o is not None:
                out[(m.pid, m.start)] = Placement(m.inode, o.pid, o.start - o.pgoff)
    return out


def judge(pid: int, mine: Sequence[ShmMap], members: Sequence[Sequence[ShmMap]],
          outside: Mapping[Object, Sequence[int]]) -> tuple[tuple[int, Seen], ...]:
    """(start, what was seen) of each shmem VMA of ``pid`` (its ``mine``; ``members``:
    every member's, in pre-order, ``pid``'s included) given the processes outside the
    dump mapping each object (``outside``)."""
    owners = _owners(members)
    out = []
    for m in mine:
        others = tuple(sorted({x.pid for maps in members for x in maps
                               if x.obj == m.obj and x.pid != pid}))
        covered = True
        if m.obj in owners:
            first = owners[m.obj]
            covered = all(owner_vma(m.obj, first, x.pgoff, x.last) is not None
                          for maps in members for x in maps if x.obj == m.obj)
        out.append((m.start, Seen(tuple(sorted(set(outside.get(m.obj, ())))), others,
                                  covered)))
    return tuple(out)


def refusal(seen: Seen | None) -> str | None:
    """Why a restore cannot bring back a VMA's shared anonymous memory, or None."""
    if seen is None:
        return None
    if seen.outside:
        return (f"that {_processes(seen.outside)} outside the dump map too (inherited "
                "across fork()): a restore would make a copy for this process alone, cut "
                "off from them: not supported yet")
    if not seen.covered:
        return (f"that {_processes(seen.members)} of the dump map too, mapped in parts by "
                "different members (the first one's mapping does not cover every other's): "
                "not supported yet")
    return None


def _processes(pids: Sequence[int]) -> str:
    return f"process{'es' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"


def not_owned(pid: int, vmas: Iterable[VmaInfo], placed: Mapping[int, Placement],
              ) -> list[tuple[int, int]]:
    """(start, end) of the VMAs of ``pid`` whose pages another member stores (``placed``:
    by VMA start, from :func:`place`)."""
    return [(v.start, v.end) for v in vmas if v.start in placed
            and placed[v.start].owner != pid]


def owned_whole(pid: int, vmas: Iterable[VmaInfo], placed: Mapping[int, Placement],
                ) -> list[tuple[int, int, str]]:
    """(start, end, WHOLE) of the VMAs whose pages ``pid`` stores for other members too."""
    return [(v.start, v.end, WHOLE) for v in vmas if v.start in placed
            and placed[v.start].owner == pid]


# --------------------------------------------------------------------------- /proc


def _outside(memo: dict[Any, Any], paths: set[str], exclude: set[int],
             ) -> dict[Object, list[int]]:
    """Every process but ``exclude`` mapping a shmem object under one of ``paths``
    ("/dev/zero (deleted)", a name given with PR_SET_VMA_ANON_NAME), by object: one scan
    of every /proc/PID/maps, kept in ``memo``."""
    found: dict[Object, list[int]] | None = memo.get(MAPS_MEMO)
    if found is None:
        found = {}
        for maps in scan_maps(paths | {SHMEM_NAMES[0]}, exclude).values():
            for other, dev, ino in maps:
                found.setdefault((dev, ino), []).append(other)
        memo[MAPS_MEMO] = found
    return found


def member_maps(pid: int, vmas: Sequence[VmaInfo], tree: Sequence[int]) -> list[list[ShmMap]]:
    """Every member's shmem VMAs in pre-order (``pid``'s from ``vmas``), read afresh."""
    return [of_vmas(pid, vmas) if p == pid else read_shmem_maps(p) for p in tree]


def inspect(pid: int, vmas: Sequence[VmaInfo], tree: Sequence[int],
            memo: dict[Any, Any] | None = None) -> tuple[tuple[int, Seen], ...]:
    """(start, what was seen) of each shmem VMA of ``pid`` (``tree``: the dump's members
    in pre-order, or just ``pid``)."""
    mine = of_vmas(pid, vmas)
    if not mine:
        return ()
    members = member_maps(pid, vmas, tree) if len(tree) > 1 else [mine]
    outside = _outside({} if memo is None else memo, {v.path for v in vmas if is_shmem(v)},
                       {pid, os.getpid(), *tree})
    return judge(pid, mine, members, outside)


def placements(pid: int, vmas: Sequence[VmaInfo], tree: Sequence[int]) -> dict[int, Placement]:
    """By VMA start: what each Vma of ``pid`` records of a shmem object other members
    map too (read while the tree is frozen)."""
    if len(tree) < 2 or not any(is_shmem(v) for v in vmas):
        return {}
    return {start: p for (who, start), p in place(member_maps(pid, vmas, tree)).items()
            if who == pid}
