"""A restored process must not gain file access it did not have.

The stub reopens files and maps them while it is still root, before the credentials are
restored last. Between dump and restore a path may come to name another file (a symlink
to /etc/shadow where a log was): opened as root, the restored process would hold a file
it could never have opened. So each file the stub opens is checked against two ways the
process could legitimately hold it:

    the same file as at dump time      (device, inode) of the opened file equal what the
                                       image recorded: the very file it had open or mapped
    a file it may open now             a thread of ckpt, switched to the process's fsuid,
                                       fsgid, groups and effective capabilities, opens the
                                       path with the same access mode and gets this file

Anything else is refused, naming the fd or mapping and the path. Memfds, deleted files
(open or mapped) and a deleted working directory are not checked: ckpt makes them afresh
from the image (the directory in its parent, checked to be the same), no path reaches
another file. A process whose filesystem identity is root with every capability could
open anything: nothing to check.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

from ckpt.collect.fdkinds.base import fs_identity
from ckpt.collect.maps import read_maps
from ckpt.collect.restorable import file_identity
from ckpt.errors import CkptError, RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.creds import FsIdentity
from ckpt.restore.mm import backing_mode

Identity = tuple[int, int]  # (st_dev, st_ino)


def legitimate(opened: Identity, dumped: Identity | None, as_process: Identity | None) -> bool:
    """May the restored process hold the file ``opened``? ``dumped``: what the image
    recorded (None: not recorded); ``as_process``: what the path gives the process's own
    identity now (None: it may not open it)."""
    return opened in (dumped, as_process)


def open_as(who: FsIdentity, requests: list[tuple[str, int]]) -> dict[tuple[str, int],
                                                                       Identity | None]:
    """What each (path, O_RDONLY/O_WRONLY/O_RDWR | O_DIRECTORY) gives ``who``: the file's
    identity, or None if ``who`` may not open it. Done in a thread of its own, whose
    credentials are switched and die with it."""
    try:
        return who.run(lambda: {(path, flags): _try_open(path, flags)
                                for path, flags in requests})
    except (CkptError, OSError) as exc:
        raise RestoreError(f"cannot check file access as uid {who.fsuid}: {exc}") from None


def _try_open(path: str, flags: int) -> Identity | None:
    if flags & os.O_DIRECTORY:  # a working directory: chdir there, as the process would
        try:
            os.chdir(path)  # this thread's own (FsIdentity.run unshares CLONE_FS)
        except OSError:
            return None
        return file_identity(".")
    try:
        fd = os.open(path, flags | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Held:
    """Something the stub holds for the process: ``same`` is its identity in the form the
    image recorded (compared with ``dumped``), ``actual`` the stat path of the file itself
    (compared with what the process may open)."""

    what: str
    path: str
    mode: int  # O_ACCMODE bits, or O_DIRECTORY for the working directory
    same: Identity | None
    dumped: Identity | None
    actual: str


def check_access(pid: int, entry: pb.ProcessEntry) -> None:
    """Once the stub ``pid`` holds the process's files, mappings and working directory
    (before its credentials are restored): refuse any it could not legitimately hold."""
    who = fs_identity(entry)
    if who.unrestricted:
        return
    held: list[Held] = []
    files = {f.id: f for f in entry.files}
    for fd in entry.fds:
        f = files[fd.file_id]
        if f.type == pb.OpenFile.REGULAR:
            at = f"/proc/{pid}/fd/{fd.fd}"
            held.append(Held(f"fd {fd.fd}", f.path, f.flags & os.O_ACCMODE, file_identity(at),
                             (f.dev, f.inode) if f.inode else None, at))
    # a mapping is compared as /proc/PID/maps shows it on both sides (the superblock's
    # device, which is not st_dev on btrfs subvolumes), wherever the stub's VMAs split or
    # merged differently from the image's
    maps = read_maps(pid)
    starts = [m.start for m in maps]
    made = {(o.dev, o.inode) for o in entry.mapped_objects}  # made fresh, not opened by path
    for v in entry.vmas:
        if v.kind in (pb.Vma.FILE_PRIVATE, pb.Vma.FILE_SHARED) and (v.dev, v.inode) not in made:
            i = bisect.bisect_right(starts, v.start) - 1
            m = maps[i] if i >= 0 and maps[i].end > v.start else None
            held.append(Held(f"the mapping at {v.start:#x}", v.path, backing_mode(v),
                             (m.dev, m.inode) if m is not None and m.inode else None,
                             (v.dev, v.inode) if v.inode else None,
                             f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}" if m else ""))
    if entry.cwd and not entry.HasField("deleted_cwd"):  # made afresh, its parent checked
        at = f"/proc/{pid}/cwd"
        held.append(Held("the working directory", entry.cwd, os.O_DIRECTORY, file_identity(at),
                         (entry.cwd_dev, entry.cwd_inode) if entry.cwd_inode else None, at))
    doubtful = [h for h in held if h.same is None or h.same != h.dumped]  # not provably it
    if not doubtful:
        return
    now = open_as(who, [(h.path, h.mode) for h in doubtful])
    for h in doubtful:
        actual = file_identity(h.actual) if h.actual else None
        if actual is None or not legitimate(actual, None, now[(h.path, h.mode)]):
            raise RestoreError(f"{h.what}: {h.path} is not the file the process had (device "
                               f"or inode changed) and uid {who.fsuid} may not open it "
                               "itself: the restored process would gain access; refused")
