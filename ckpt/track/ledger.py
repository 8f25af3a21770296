"""Which pass last consumed a process's dirty tracking: one small file per process.

Reading the dirty state re-arms it (PAGEMAP_SCAN with WP_MATCHING, clear_refs): once a
pass has begun, what was written before it is known to that pass's images only. Another
pass from the same parent (a retry after a pass that failed half-way, a second branch of
the chain) must not trust the tracker, or it would miss those pages. So every pass draws
a fresh token and records it here *before* it consumes anything, its tracker.img carries
the token, and the next pass trusts its parent's tracker state only while the token here
is still the parent's. Anything else reads as "tracking state lost": whole-VMA copies.

    $CKPT_STATE_DIR/track/<pid>-<starttime>        CKPT_STATE_DIR defaults to /run/ckpt

/run is a tmpfs: the records go with a reboot, as do the processes they describe.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from ckpt.errors import CkptError

DEFAULT_STATE_DIR = "/run/ckpt"


def _dir() -> Path:
    return Path(os.environ.get("CKPT_STATE_DIR") or DEFAULT_STATE_DIR) / "track"


def _path(pid: int, start_time: int) -> Path:
    return _dir() / f"{pid}-{start_time}"


def new_token() -> str:
    return secrets.token_hex(8)


def last_token(pid: int, start_time: int) -> str:
    """The token of the pass that last consumed this process's tracking, or ''."""
    try:
        return _path(pid, start_time).read_text().strip()
    except OSError:
        return ""


def claim(pid: int, start_time: int, token: str) -> None:
    """Record that the pass ``token`` consumes the tracking now (atomically)."""
    path = _path(pid, start_time)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp.write_text(token + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CkptError(f"cannot record the tracking state in {path.parent}: "
                        f"{exc.strerror or exc} (CKPT_STATE_DIR names another directory)",
                        ) from None


def forget(pid: int, start_time: int) -> None:
    """The process is gone (the final dump killed it): drop its record."""
    with contextlib.suppress(OSError):
        _path(pid, start_time).unlink(missing_ok=True)
    clear_uffd_intent(pid, start_time)


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
