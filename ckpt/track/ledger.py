"""Which pass last consumed a process's dirty tracking: one small file per process.

Reading the dirty state re-arms it (PAGEMAP_SCAN with WP_MATCHING, clear_refs): once a
pass has begun, what was written before it is known to that pass's images only. Another
pass from the same parent (a retry after a pass that failed half-way, a second branch of
the chain, a parallel pass) must not trust the tracker, or it would miss those pages. So
every pass draws a fresh token and swaps it into the record here *before* it consumes
anything (claim: check and claim are one step, under flock), its tracker.img carries the
token, and a pass trusts its parent's tracker state only if the token it displaced is the
parent's. Of two passes racing from one parent, exactly one displaces the parent's token;
the other reads "tracking state lost" and copies whole VMAs.

    $CKPT_STATE_DIR/track/<pid>-<starttime>        CKPT_STATE_DIR defaults to /run/ckpt

/run is a tmpfs: the records go with a reboot, as do the processes they describe. Records
of processes that are gone (no such pid, or another start time) are pruned by every pass
that tracks (before it freezes anything), with the 0-byte temporaries older versions of
ckpt could leave behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from ckpt.collect import proc
from ckpt.errors import CkptError
from ckpt.images.safedir import make_dirs

DEFAULT_STATE_DIR = "/run/ckpt"

_RECORD = re.compile(r"(\d+)-(\d+)(?:\.uffd)?")  # a record, or its uffd intent
_OLD_TEMP = re.compile(r"\.(\d+)-(\d+)\.(\d+)")  # .<pid>-<start>.<writer pid>


def _dir() -> Path:
    return Path(os.environ.get("CKPT_STATE_DIR") or DEFAULT_STATE_DIR) / "track"


def new_token() -> str:
    return secrets.token_hex(8)


def claim(pid: int, start_time: int, token: str) -> str:
    """Record that the pass ``token`` consumes the process's tracking now, and return
    the token of the pass that consumed it before ('' if none): one atomic exchange."""
    where = _dir()
    try:
        make_dirs(where)
        fd = os.open(where / f"{pid}-{start_time}",
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
            previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
            os.ftruncate(fd, 0)  # a crash before the write leaves '': trusted by no one
            os.pwrite(fd, f"{token}\n".encode(), 0)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CkptError(f"cannot record the tracking state in {where}: "
                        f"{exc.strerror or exc} (CKPT_STATE_DIR names another directory)",
                        ) from None
    return previous


def forget(pid: int, start_time: int) -> None:
    """The process is gone (the final dump killed it): drop its record."""
    with contextlib.suppress(OSError):
        (_dir() / f"{pid}-{start_time}").unlink(missing_ok=True)
    clear_uffd_intent(pid, start_time)


def stale(name: str, start_time_of: Callable[[int], int | None]) -> bool:
    """Is the ledger entry ``name`` left over? start_time_of(pid) is a live process's
    start time, None if there is none. A record is stale once its process is gone; an
    old temporary once its record is or the pass that wrote it is gone."""
    m = _RECORD.fullmatch(name)
    if m:
        return start_time_of(int(m[1])) != int(m[2])
    m = _OLD_TEMP.fullmatch(name)
    if m:
        return start_time_of(int(m[1])) != int(m[2]) or start_time_of(int(m[3])) is None
    return False


def prune(root: str = "/proc") -> None:
    """Remove the stale entries of the ledger (best effort: a ledger that cannot be
    read is reported by claim)."""
    def start_time_of(pid: int) -> int | None:
        try:
            return proc.read_stat(pid, root=root).starttime
        except CkptError:
            return None

    where = _dir()
    try:
        names = os.listdir(where)
    except OSError:
        return
    for name in names:
        if stale(name, start_time_of):
            with contextlib.suppress(OSError):
                os.unlink(where / name)


def _intent_path(pid: int, start_time: int) -> Path:
    return _dir() / f"{pid}-{start_time}.uffd"


def note_uffd_intent(pid: int, start_time: int) -> None:
    """Before ckpt injects userfaultfd() into the process: should ckpt die before the uffd
    reaches its high fd, the next pass knows a new low-numbered uffd is ckpt's."""
    path = _intent_path(pid, start_time)
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text("userfaultfd\n")


def uffd_intent(pid: int, start_time: int) -> bool:
    return _intent_path(pid, start_time).exists()


def clear_uffd_intent(pid: int, start_time: int) -> None:
    with contextlib.suppress(OSError):
        _intent_path(pid, start_time).unlink(missing_ok=True)
