"""Writing into an images directory without trusting its path or what others left in it.
One implementation for local passes (ckpt.images.imagedir) and the page server's
receiving side (ckpt.transfer.server).

    make_dirs(path)            missing components created 0700, whatever the umask
    WritableDir.open(path)     an O_DIRECTORY fd; fstat of that very fd must show a
                               directory of the caller's, not writable by group or
                               others (unsafe_dir) -- else one clear error
    .create(name)              ".<name>.tmp" created O_CREAT|O_EXCL|O_NOFOLLOW relative to
                               the fd, mode 0600: an entry of that name (a leftover, or a
                               link someone planted) is unlinked first -- removed, never
                               followed -- and a new one appearing in between fails EEXIST
    AtomicFile.commit()        renamed onto <name> relative to the fd; discard() (or an
                               exception in its with block) leaves nothing

A root-owned file a planted ".inventory.img.tmp -> /etc/x" points to is never opened,
let alone truncated or chmodded.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from types import TracebackType

from ckpt.errors import ImageError

DIR_MODE = 0o700
FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class UnsafeDir(ImageError):
    """The directory is someone else's, or others may write into it."""


def unsafe_dir(path: str, st_uid: int, st_mode: int, uid: int) -> str:
    """'' if the directory (its owner and mode) is safe for ``uid`` to write images
    into, else why not (one line)."""
    if not stat.S_ISDIR(st_mode):
        return f"{path} is not a directory"
    if st_uid != uid:
        return (f"images directory {path} belongs to uid {st_uid}, not to you (uid {uid}): "
                "refusing to write into it")
    if st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002))
                           if st_mode & bit)
        return (f"images directory {path} is writable by {who} (mode "
                f"{stat.S_IMODE(st_mode):04o}): refusing to write into it")
    return ""


def make_dirs(path: str | os.PathLike[str], mode: int = DIR_MODE) -> list[Path]:
    """Create ``path`` and its missing ancestors, each ``mode`` exactly (umask or not).
    Returns the directories created, outermost first."""
    missing: list[Path] = []
    cur = Path(os.path.abspath(path))
    while not os.path.lexists(cur):
        missing.append(cur)
        cur = cur.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:  # made in between by someone else: not ours
            continue
        created.append(d)
        fd = os.open(d, _DIR_FLAGS | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    return created


class WritableDir:
    """An open, checked directory that files are written into (see the module doc)."""

    def __init__(self, fd: int, path: Path) -> None:
        """Use WritableDir.open."""
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str], follow: bool = True) -> WritableDir:
        """Open and check ``path``; follow=False refuses a symlink in its last component.
        Raises OSError, or UnsafeDir."""
        p = Path(path)
        fd = os.open(p, _DIR_FLAGS | (0 if follow else os.O_NOFOLLOW))
        try:
            st = os.fstat(fd)
            why = unsafe_dir(str(p), st.st_uid, st.st_mode, os.geteuid())
            if why:
                raise UnsafeDir(why)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, p)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> WritableDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, name: str, mode: int = FILE_MODE) -> AtomicFile:
        """A new, empty file that becomes ``name`` on commit (raises OSError)."""
        return AtomicFile(self, name, mode)

    def unlink(self, name: str) -> None:
        """Remove ``name`` if it is there (a link itself, never what it points to)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)


def temp_name(name: str) -> str:
    return f".{name}.tmp"


class AtomicFile:
    """A file written under temp_name(name), renamed onto ``name`` by commit()."""

    def __init__(self, parent: WritableDir, name: str, mode: int) -> None:
        self.dir, self.name, self.tmp = parent, name, temp_name(name)
        self.fd, self.committed = -1, False
        parent.unlink(self.tmp)  # an earlier crash's leftover, or a planted link
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, mode, dir_fd=parent.fd)
        try:
            os.fchmod(self.fd, mode)  # not narrowed by the umask
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        """Close the file (a deferred write error surfaces here) and rename it into
        place. On failure the temp file is gone and OSError raised."""
        try:
            fd, self.fd = self.fd, -1
            os.close(fd)
            os.replace(self.tmp, self.name, src_dir_fd=self.dir.fd, dst_dir_fd=self.dir.fd)
        except BaseException:
            self.discard()
            raise
        self.committed = True

    def discard(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            self.dir.unlink(self.tmp)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.committed:
            self.discard()
