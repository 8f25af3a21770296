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

Anything else is refused, naming the fd or mapping and the path. A process whose
filesystem identity is root with every capability could open anything: nothing to check.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.creds import assume_fs_identity
from ckpt.restore.mm import backing_mode

Identity = tuple[int, int]  # (st_dev, st_ino)
FULL_CAPS = (1 << 41) - 1


@dataclass(frozen=True)
class FsIdentity:
    """Whose file access the restored process has (its leader's, as dumped)."""

    fsuid: int
    fsgid: int
    groups: tuple[int, ...]
    cap_eff: int

    @classmethod
    def of(cls, entry: pb.ProcessEntry) -> FsIdentity:
        c = entry.threads[0].creds
        return cls(c.fsuid, c.fsgid, tuple(c.groups), c.cap_eff)

    @property
    def unrestricted(self) -> bool:
        return self.fsuid == 0 and self.cap_eff & FULL_CAPS == FULL_CAPS


def legitimate(opened: Identity, dumped: Identity | None, as_process: Identity | None) -> bool:
    """May the restored process hold the file ``opened``? ``dumped``: what the image
    recorded (None: not recorded); ``as_process``: what the path gives the process's own
    identity now (None: it may not open it)."""
    return opened in (dumped, as_process)


def identity_of(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def open_as(who: FsIdentity, requests: list[tuple[str, int]]) -> dict[tuple[str, int],
                                                                       Identity | None]:
    """What each (path, O_RDONLY/O_WRONLY/O_RDWR | O_DIRECTORY) gives ``who``: the file's
    identity, or None if ``who`` may not open it. Done in a thread of its own, whose
    credentials are switched and die with it."""
    out: dict[tuple[str, int], Identity | None] = {}
    failure: list[BaseException] = []

    def work() -> None:
        try:
            assume_fs_identity(who.fsuid, who.fsgid, who.groups, who.cap_eff)
            for path, flags in requests:
                out[(path, flags)] = _try_open(path, flags)
        except BaseException as exc:  # reported in the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=work, name="ckpt-access-check")
    worker.start()
    worker.join()
    if failure:
        raise RestoreError(f"cannot check file access as uid {who.fsuid}: {failure[0]}")
    return out


def _try_open(path: str, flags: int) -> Identity | None:
    if flags & os.O_DIRECTORY:  # a working directory: search permission, as chdir needs
        if not os.access(path, os.X_OK, effective_ids=True):
            return None
        return identity_of(path)
    try:
        fd = os.open(path, flags | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino
    finally:
        os.close(fd)


def check_access(pid: int, entry: pb.ProcessEntry) -> None:
    """Once the stub ``pid`` holds the process's files, mappings and working directory
    (before its credentials are restored): refuse any it could not legitimately hold."""
    who = FsIdentity.of(entry)
    if who.unrestricted:
        return
    held: list[tuple[str, str, int, Identity | None, Identity | None]] = []  # what, path,
    # mode, opened, dumped
    files = {f.id: f for f in entry.files}
    for fd in entry.fds:
        f = files[fd.file_id]
        if f.type == pb.OpenFile.REGULAR:
            held.append((f"fd {fd.fd}", f.path, f.flags & os.O_ACCMODE,
                         identity_of(f"/proc/{pid}/fd/{fd.fd}"),
                         (f.dev, f.inode) if f.inode else None))
    for v in entry.vmas:
        if v.kind in (pb.Vma.FILE_PRIVATE, pb.Vma.FILE_SHARED):
            held.append((f"the mapping at {v.start:#x}", v.path, backing_mode(v),
                         identity_of(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}"),
                         (v.dev, v.inode) if v.inode else None))
    if entry.cwd:
        held.append(("the working directory", entry.cwd, os.O_RDONLY | os.O_DIRECTORY,
                     identity_of(f"/proc/{pid}/cwd"),
                     (entry.cwd_dev, entry.cwd_inode) if entry.cwd_inode else None))
    doubtful = [h for h in held if h[3] is None or h[3] != h[4]]  # not provably the same
    if not doubtful:
        return
    now = open_as(who, [(path, mode) for _, path, mode, _, _ in doubtful])
    for what, path, mode, opened, dumped in doubtful:
        if opened is None or not legitimate(opened, dumped, now[(path, mode)]):
            raise RestoreError(f"{what}: {path} is not the file the process had (device or "
                               f"inode changed) and uid {who.fsuid} may not open it itself: "
                               "the restored process would gain access; refused")
