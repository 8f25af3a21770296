"""The fd rows of ckpt.collect.restorable's table (its docstring lists them): an fd of a
kind of ckpt.collect.fdkinds is judged by its kind, any other by FD_RULES; then its locks,
its holders outside the dump and its owner (F_SETOWN)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ckpt.collect.fdkinds import fown, locks
from ckpt.collect.fds import FdInfo, classify_fd, describe_fd
from ckpt.collect.holders import Sharing
from ckpt.collect.rules import NOT_YET, PROC_PID, Rule, deleted, first
from ckpt.collect.target import Target

#: Character devices a reopen brings back exactly: they keep no state (major 1, "mem").
STATELESS_DEVICES = frozenset(os.makedev(1, minor) for minor in (3, 5, 7, 8, 9))
NAMESPACE = re.compile(r"[a-z_]+:\[\d+\]")


@dataclass(frozen=True)
class Fd:
    """An fd as the rules see it: its record, its class (ckpt.collect.fds.classify_fd),
    whether fds 0-2 may be a terminal (--shell-job), whether its path is foreign."""

    info: FdInfo
    kind: str
    shell_job: bool
    foreign: bool = False
    holders: tuple[int, ...] = ()  # other processes sharing its open file

    @property
    def append_only(self) -> bool:
        """Write-only O_APPEND: every write goes to the end, whoever else writes."""
        flags = self.info.flags
        return flags & os.O_ACCMODE == os.O_WRONLY and bool(flags & os.O_APPEND)

    @property
    def target(self) -> str:
        return self.info.target


FD_RULES: tuple[Rule[Fd], ...] = (
    Rule(lambda f: f.kind == "tty" and not (f.shell_job and f.info.fd <= 2),
         "a terminal; use --shell-job for fds 0-2"),
    Rule(lambda f: f.kind in ("socket", "anon_inode", "other"), NOT_YET),
    Rule(lambda f: deleted(f.target), "the file was deleted: " + NOT_YET),
    Rule(lambda f: bool(NAMESPACE.fullmatch(f.target)),
         "a namespace file (/proc/PID/ns/*): " + NOT_YET),
    Rule(lambda f: f.kind != "tty" and not f.target.startswith("/"),
         "not a path a restore can open: " + NOT_YET),
    Rule(lambda f: bool(PROC_PID.match(f.target)),
         "a file of a process under /proc (it names a pid): " + NOT_YET),
    Rule(lambda f: f.kind == "chardev" and f.info.st_rdev not in STATELESS_DEVICES,
         "a character device {dev}: its state lives in the driver; " + NOT_YET),
    Rule(lambda f: _refused_lock(f) is not None, locks.REFUSED),
    Rule(lambda f: bool(f.holders) and locks.open_file_lock(f.info) is not None,
         "holds {shared_lock} on an open file {holders} shares (inherited across fork() "
         "or passed over a unix socket): the lock would stay with it and a restore could "
         "not take it again: " + NOT_YET),
    Rule(lambda f: bool(f.holders) and not f.append_only,
         "an open file {holders} shares (inherited across fork() or passed over a unix "
         "socket): a restore reopens it for this process alone, so its position and flags "
         "would no longer be shared: " + NOT_YET),
    Rule(lambda f: f.foreign,
         "another file (or none) in ckpt's mount namespace: " + NOT_YET),
)


def _refused_lock(f: Fd) -> str | None:
    return locks.refused_lock(f.info, reopened=f.kind != "tty")  # a terminal is ckpt's own


def fd_fields(f: Fd) -> dict[str, object]:
    shared = locks.open_file_lock(f.info)
    return {"dev": f"{os.major(f.info.st_rdev)}:{os.minor(f.info.st_rdev)}",
            "lock": _refused_lock(f) or "", "holders": processes(f.holders),
            "shared_lock": f"a {shared.shown} lock" if shared else ""}


def processes(pids: tuple[int, ...]) -> str:
    """"process 12", "processes 12, 14": how a refusal names other holders."""
    return f"process{'es' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"


#: an fd of a kind (not OWN) whose object other processes hold too
HELD = ("one {kind} that {holders} outside the dump also holds (inherited across fork() or "
        "passed over a unix socket): a restore would make a new one for this process "
        "alone, cut off from it: " + NOT_YET)


def fd_refusal(info: FdInfo, shell_job: bool, foreign: bool = False,
               holders: tuple[int, ...] = ()) -> str | None:
    """Why restore cannot bring this fd back, or None."""
    fd = Fd(info, classify_fd(info), shell_job, foreign, holders)
    why = first(FD_RULES, fd, fd_fields)
    return f"{describe_fd(info)}: {why}" if why else None


def fd_refusals(t: Target) -> list[str]:
    """One line per fd of ``t`` a restore could not bring back, by fd number."""
    out: list[str] = []
    claimed = {fd: (kind, details) for fd, kind, details in t.fd_kinds}
    held = dict(t.holders)
    owners = dict(t.fd_owners)
    tids = {tid for tid, _ in t.thread_cwds}
    for info in sorted(t.fds, key=lambda i: i.fd):
        if info.fd in t.shared_fds:  # an earlier member's open file: judged with it, but
            why = locks.refusal(info, reopened=info.fd not in claimed)  # for its locks
            if why:
                out.append(f"{describe_fd(info)}: {why}")
            continue
        if info.fd in claimed:
            kind, details = claimed[info.fd]
            others = held.get(info.fd, ()) if kind.holders is not Sharing.OWN else ()
            why = (locks.refusal(info, reopened=False)
                   or (HELD.format(kind=kind.name, holders=processes(others)) if others
                       else kind.refuse(info, details, t.fd_flags)))
            if not why and info.target in t.foreign:  # a FIFO, ... reopened by path
                why = "another file (or none) in ckpt's mount namespace: " + NOT_YET
            line = f"{describe_fd(info)}: {why}" if why else None
        else:
            line = fd_refusal(info, t.shell_job, info.target in t.foreign,
                              held.get(info.fd, ()))
        if not line and info.fd in owners:
            why = fown.refusal(owners[info.fd], t.pid, tids, t.pgid, t.sid,
                               t.fd_flags.shell_job, t.tree)
            line = f"{describe_fd(info)}: {why}" if why else None
        if line:
            out.append(line)
    return out
