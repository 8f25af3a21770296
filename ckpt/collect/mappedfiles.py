"""Mapped memfds and deleted files: VMAs of "/memfd:NAME (deleted)" or "PATH (deleted)",
MAP_SHARED or MAP_PRIVATE, with or without an fd of the process still open on the file.
Their file is reached through /proc/PID/map_files/START-END (root may open it).

    dump, before the      inspect: each such VMA's file, judged like an open memfd or
    freeze and frozen     deleted file (ckpt.collect.fdkinds.memfd.judge: --ghost-limit,
                          other links, its directory); refused when another process maps
                          it or has it open (ckpt.collect.holders' scans: a restore would
                          cut the sharing), and under migrate (FdFlags.migrating: a
                          warm restore maps files by path, pass by pass)
    dump, frozen          collect: one MappedObject per (Vma.dev, Vma.inode). If an fd of
                          the process has the same inode open, the object is that open
                          file's (file_id: the fd kind saved the contents), else the
                          contents are read here (file), up to --ghost-limit alike
    restore, before mmap  make_objects: each object made again in ckpt, unsealed
                          (memfd.make); ckpt.restore.mm's Backing gives the stub a reopen
                          of it (the VMA's access mode) with pidfd_getfd
    mmap and seal         Made.seal: F_ADD_SEALS between the mappings. The kernel refuses
                          F_SEAL_WRITE while a shared mapping may write ("mw"), and a
                          shared mapping made after F_SEAL_WRITE or F_SEAL_FUTURE_WRITE
                          loses "mw" for good: so the first are mapped before the seals,
                          the second after them (Made.after_seal)
    restore, files        open files of the same inode reopen the same object
                          (RestoreCtx.objects): one inode again, so a write through the fd
                          shows in the mapping and the other way round

In a tree (``ckpt dump -t``), members mapping or holding the same file are no other
processes. The first member in pre-order that maps or holds it carries it (its contents,
in its images, as above); a later member's MappedObject names it (``file.shared_pid``,
the file's type and dumped st_dev/st_ino, no contents: earlier_holder). A tree's
restore passes its TreeScope to make_objects: ``TreeScope.objects`` is then the registry
of every file made so far, keyed by memfd.object_key, shared with the fd kinds (an open
memfd made by an earlier member's restore_files is found there too), so every member maps
and opens the one file again.

MAP_SHARED pages are the file's (ckpt.pagecopy.plan: NO_PAGES), so they travel as its
contents, read while frozen; a MAP_PRIVATE mapping's written (COW) pages are dumped as any
private file mapping's, its clean pages come from the file.

What differs after a restore: the inode number (a new file), and a deleted file's link
("DIR/#INODE (deleted)" from O_TMPFILE, see memfd.make_ghost).
"""

from __future__ import annotations

import fcntl
import functools
import os
import stat
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckpt.collect.fdkinds import memfd
from ckpt.collect.fdkinds.base import FdFlags, TreeScope, made_as_process
from ckpt.collect.holders import TreeView, scan_links, scan_maps
from ckpt.collect.maps import read_maps
from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb

if TYPE_CHECKING:  # ckpt.collect.files imports ckpt.collect.restorable, which imports this
    from ckpt.collect.files import FileRecord

FILE_KINDS = (VmaKind.FILE_PRIVATE, VmaKind.FILE_SHARED)
#: names the kernel gives its own mappings of unlinked inodes (refused elsewhere)
KERNEL_NAMES = ("/[aio]", "/anon_hugepage")
TYPES = (pb.OpenFile.MEMFD, pb.OpenFile.GHOST)
#: a dump's pass stats (DumpStats.whole_vmas): not tracked, saved whole every time
WHOLE = "memfd or deleted file mapped MAP_SHARED: its contents saved whole in the core image"


def is_mapped_object(kind: int, path: str) -> bool:
    """Does a VMA (its kind and path) map a memfd or a deleted file?"""
    return (kind in FILE_KINDS and path.endswith(memfd.DELETED)
            and not path.startswith(KERNEL_NAMES))


def shared_spans(vmas: Iterable[VmaInfo]) -> list[tuple[int, int]]:
    """(start, end) of the VMAs whose memory is a mapped object's contents (WHOLE)."""
    return [(v.start, v.end) for v in vmas
            if v.kind == VmaKind.FILE_SHARED and is_mapped_object(v.kind, v.path)]


def map_files(pid: int, v: VmaInfo, root: str = "/proc") -> str:
    return f"{root}/{pid}/map_files/{v.start:x}-{v.end:x}"


# --------------------------------------------------------------------------- refuse


@dataclass(frozen=True)
class Seen:
    """What inspect saw of the file a VMA maps."""

    found: memfd.Found  # what memfd.judge needs
    holders: tuple[int, ...] = ()  # other processes mapping it or holding it open


def inspect(pid: int, vmas: Iterable[VmaInfo], tree: TreeView | None = None,
            ) -> tuple[tuple[int, Seen], ...]:
    """(start, what was seen) of each VMA mapping a memfd or deleted file; in a tree dump
    (``tree``), the members mapping it or holding it open are no other processes."""
    mapped = [v for v in vmas if is_mapped_object(v.kind, v.path)]
    if not mapped:
        return ()
    wanted = {v.path for v in mapped}
    exclude = {pid, os.getpid(), *(tree.pids if tree is not None else ())}
    links, maps = scan_links(wanted, exclude), scan_maps(wanted, exclude)
    out = []
    for v in mapped:
        try:
            fd = os.open(map_files(pid, v), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            out.append((v.start, Seen(memfd.Found(0, 0, False, memfd.directory_exists(v.path),
                                                  exc.strerror or str(exc)))))
            continue
        try:
            st = os.fstat(fd)
            found = memfd.examine(fd, v.path)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            found = memfd.Found(0, 0, False, False, "not a regular file")
        holders = {p for p, dev, ino in maps.get(v.path, ()) if (dev, ino) == (v.dev, v.inode)}
        holders |= {p for p, n in links.get(v.path, ()) if p not in holders
                    and proc_identity(p, n) == (st.st_dev, st.st_ino)}
        out.append((v.start, Seen(found, tuple(sorted(holders)))))
    return tuple(out)


def proc_identity(pid: int, fd: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def refusal(v: VmaInfo, seen: Seen | None, flags: FdFlags) -> str | None:
    """Why the memfd or deleted file ``v`` maps cannot be mapped again, or None (pure)."""
    if not is_mapped_object(v.kind, v.path):
        return None
    if flags.warm_migration:
        return ("migrate does not carry mapped memfds and deleted files yet for one "
                "process (dump does, and migrate of a tree)")
    if seen is None:
        return "its file could not be looked at"
    if seen.holders:
        pids, many = ", ".join(map(str, seen.holders)), len(seen.holders) > 1
        return (f"process{'es' if many else ''} {pids} outside the dump also "
                f"{'map it or hold it' if many else 'maps it or holds it'} open: a restore "
                "would make a new one for this process alone, cut off from it: "
                "not supported yet")
    return memfd.judge(v.path, seen.found, flags)


# --------------------------------------------------------------------------- collect


def deleted_maps(pid: int) -> set[tuple[int, int]]:
    """(dev, inode) of every mapping of a deleted file (memfds too) of ``pid``."""
    return {(m.dev, m.inode) for m in read_maps(pid) if m.deleted}


def earlier_holder(pid: int, mapped: tuple[int, int], stat_id: tuple[int, int],
                   tree: TreeView | None,
                   maps_of: Callable[[int], Collection[tuple[int, int]]] = deleted_maps,
                   ) -> int | None:
    """The first member of ``tree`` before ``pid`` in pre-order that maps the file
    (``mapped``: Vma.dev, Vma.inode) or holds an fd on it (``stat_id``: st_dev, st_ino),
    or None: that member's images carry the file, its restore makes it (pure but for
    ``maps_of``)."""
    if tree is None:
        return None
    for member in tree.pids:
        if member == pid:
            return None
        if any((i.st_dev, i.st_ino) == stat_id for i in tree.fds.get(member, ())) \
                or mapped in maps_of(member):
            return member
    return None


def collect_mapped(pid: int, vmas: Sequence[VmaInfo], files: Sequence[FileRecord],
                   tree: TreeView | None = None) -> list[pb.MappedObject]:
    """One MappedObject per file mapped (while frozen: MAP_SHARED contents are the data).
    In a tree dump, a file an earlier member maps or holds is that member's: recorded
    with its type and identity, ``file.shared_pid`` naming the member, no contents."""
    open_files = {(f.dev, f.inode): f for f in files
                  if f.payload is not None and f.payload.type in TYPES}
    next_id = max((f.id for f in files), default=0) + 1
    out: dict[tuple[int, int], pb.MappedObject] = {}
    maps_of = functools.cache(deleted_maps)
    for v in vmas:
        if not is_mapped_object(v.kind, v.path) or (v.dev, v.inode) in out:
            continue
        obj = out[(v.dev, v.inode)] = pb.MappedObject(dev=v.dev, inode=v.inode)
        fd = os.open(map_files(pid, v), os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            own = open_files.get((st.st_dev, st.st_ino))
            if own is not None and own.payload is not None and not own.payload.shared_pid:
                obj.file_id = own.id
                continue
            f = obj.file
            f.id, f.path, f.dev, f.inode, f.flags = next_id, v.path, st.st_dev, st.st_ino, \
                os.O_RDWR
            f.type = pb.OpenFile.MEMFD if v.path.startswith(memfd.MEMFD_PREFIX) \
                else pb.OpenFile.GHOST
            next_id += 1
            holder = earlier_holder(pid, (v.dev, v.inode), (st.st_dev, st.st_ino), tree,
                                    maps_of)
            if holder is not None:
                f.object, f.shared_pid = st.st_ino, holder
                continue
            memfd.save(fd, v.path, f)
        finally:
            os.close(fd)
    return list(out.values())


# --------------------------------------------------------------------------- restore


@dataclass
class Made:
    """The objects of an image's mapped files, made in ckpt before the memory is mapped
    (in a tree, some made by a member restored before: ``owned`` are this one's)."""

    by_vma: dict[tuple[int, int], int] = field(default_factory=dict)  # (dev, inode) -> fd
    objects: dict[tuple[str, int], int] = field(default_factory=dict)  # RestoreCtx.objects
    seals: list[tuple[int, int, str]] = field(default_factory=list)  # (fd, seals, path)
    owned: list[int] = field(default_factory=list)  # fds made here, closed by close()

    def after_seal(self, v: pb.Vma) -> bool:
        """Is ``v`` a shared mapping a seal made read-only for good ("sh" without "mw":
        mapped after F_SEAL_WRITE or F_SEAL_FUTURE_WRITE)? Such a VMA is mapped after
        the seals, from an O_RDWR file; every other one before them."""
        return ((v.dev, v.inode) in self.by_vma and v.shared and "sh" in v.vmflags
                and "mw" not in v.vmflags)

    def seal(self) -> None:
        """Once every VMA is mapped: the seals the memfds had."""
        for fd, seals, path in self.seals:
            try:
                fcntl.fcntl(fd, memfd.F_ADD_SEALS, seals)
            except OSError as exc:
                raise RestoreError(f"cannot seal {path} again: {exc.strerror}") from None
        self.seals.clear()

    def close(self) -> None:
        for fd in self.owned:
            os.close(fd)
        self.owned.clear()
        self.objects.clear()
        self.by_vma.clear()


def make_objects(entry: pb.ProcessEntry, tree: TreeScope | None = None) -> Made:
    """The mapped files of ``entry``, made in ckpt. In a tree's restore, ``tree.objects``
    is the registry of what every member restored so far made (by memfd.object_key: the
    dumped (type, st_dev, st_ino)): a file already there is the same object again, one
    made here is added to it (its fd stays this Made's, closed by its close()); a file
    the images say an earlier member carries (``file.shared_pid``) must be there."""
    files = {f.id: f for f in entry.files}
    made = Made()
    registry = tree.objects if tree is not None else made.objects
    try:
        for o in entry.mapped_objects:
            f = files.get(o.file_id) if o.HasField("file_id") else o.file
            if f is None or f.type not in TYPES:
                raise RestoreError(f"the image's mapped file of inode {o.inode} names no "
                                   "memfd or deleted file")
            key = memfd.object_key(f)
            if key not in made.objects:
                fd = registry.get(key)
                if fd is None and f.shared_pid:
                    raise RestoreError(f"{f.path} (mapped): process {f.shared_pid} carries "
                                       "it, and its restore did not make it first")
                if fd is None:
                    fd = memfd.make(f, made_as_process(entry), seal=False)
                    made.owned.append(fd)
                    registry[key] = fd
                    if f.type == pb.OpenFile.MEMFD and f.memfd.seals:
                        made.seals.append((fd, f.memfd.seals, f.path))
                made.objects[key] = fd
            made.by_vma[(o.dev, o.inode)] = made.objects[key]
    except BaseException:
        made.close()
        raise
    return made
