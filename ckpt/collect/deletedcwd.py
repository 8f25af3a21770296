"""A working directory that was removed: /proc/PID/cwd reads "PARENT/NAME (deleted)".

A removed directory is empty and takes no new entries; what a process still sees of it is
its mode, owner and times (stat "."), its parent (".."), and its name in /proc/PID/cwd
(getcwd(2) fails with ENOENT). So a restore makes it again:

    dump (frozen)    mode, owner, atime, mtime of the directory, and the identity of its
                     parent (stat of /proc/PID/cwd/..)
    refused before   a parent that no path reaches any more (removed too, or another
    the freeze       directory at that path; restorable.PROCESS_RULES), and under migrate
                     (another host has another parent directory)
    restore          in the same parent, checked to be the same directory: mkdir NAME
                     (NAME.XXXXXX if NAME is taken), owner and mode, the process chdirs
                     into it, times, rmdir; the parent's atime and mtime put back

What differs: the directory's inode and ctime, the parent's ctime, and the name in
/proc/PID/cwd when NAME was taken at restore time.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

from ckpt.collect.fdkinds.base import Remote
from ckpt.errors import RestoreError
from ckpt.images.pb import core_pb2 as pb
from ckpt.kernel.sys import NR

DELETED = " (deleted)"


def is_deleted(cwd: str) -> bool:
    return cwd.endswith(DELETED)


def parent_reachable(pid: int, cwd: str) -> bool:
    """Is the deleted ``cwd``'s parent (its "..") the directory its path names?"""
    try:
        there = os.stat(f"/proc/{pid}/cwd/..")
        here = os.stat(os.path.dirname(cwd.removesuffix(DELETED)) or "/")
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def collect_deleted_cwd(pid: int, cwd: str) -> pb.DeletedDir | None:
    """What a restore needs of a deleted working directory (None: not deleted)."""
    if not is_deleted(cwd):
        return None
    st, up = os.stat(f"/proc/{pid}/cwd"), os.stat(f"/proc/{pid}/cwd/..")
    return pb.DeletedDir(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                         atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns,
                         parent_dev=up.st_dev, parent_inode=up.st_ino)


def restore_deleted_cwd(remote: Remote, entry: pb.ProcessEntry) -> None:
    """Make the process's deleted working directory again and enter it (see above)."""
    d, path = entry.deleted_cwd, entry.cwd.removesuffix(DELETED)
    parent = os.path.dirname(path) or "/"
    try:
        up = os.stat(parent)
    except OSError as exc:
        raise RestoreError(f"the parent {parent} of the deleted working directory is "
                           f"gone: {exc.strerror}") from None
    if (up.st_dev, up.st_ino) != (d.parent_dev, d.parent_inode):
        raise RestoreError(f"the parent {parent} of the deleted working directory is "
                           "another directory than at dump time")
    try:
        os.mkdir(path, 0o700)
        made = path
    except FileExistsError:
        made = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", dir=parent)
    except OSError as exc:
        raise RestoreError(f"cannot make the deleted working directory {path} again: "
                           f"{exc.strerror}") from None
    fd = os.open(made, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchown(fd, d.uid, d.gid)
        os.fchmod(fd, stat.S_IMODE(d.mode))
        remote.sc(NR.chdir, remote.put_str(made), what=f"chdir {made}")
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(made)
        try:
            os.utime(fd, ns=(d.atime_ns, d.mtime_ns))
            os.utime(parent, ns=(up.st_atime_ns, up.st_mtime_ns))
        finally:
            os.close(fd)
