"""A task's credentials, from /proc/PID/task/TID/status (what /proc shows), plus what
only the task or ptrace can tell: securebits (injected prctl, ckpt.collect.tasks) and its
seccomp filters (PTRACE_SECCOMP_GET_FILTER, ckpt.kernel.creds).

Credentials are per thread in Linux (a raw setresuid or seccomp changes only the caller),
so they are read, stored and restored per thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ckpt.collect.proc import read_text
from ckpt.errors import KernelError, NoSuchProcess, NotDumpable
from ckpt.kernel.creds import SECCOMP_MODE_FILTER, seccomp_filters

#: /proc status keys whose lines must come back identical, in the kernel's order.
STATUS_KEYS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
               "NoNewPrivs", "Seccomp", "Seccomp_filters")


@dataclass(frozen=True)
class Creds:
    """One task's credentials as /proc shows them; ``uid``/``gid`` are (real, effective,
    saved, filesystem)."""

    uid: tuple[int, int, int, int]
    gid: tuple[int, int, int, int]
    groups: tuple[int, ...]
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    no_new_privs: bool
    seccomp_mode: int  # 0 off, 1 strict, 2 filter
    seccomp_filters: int  # how many filters the task has (0 unless mode 2)
    securebits: int = 0  # not in /proc: read by an injected PR_GET_SECUREBITS
    filters: list[tuple[bytes, int]] = field(default_factory=list, compare=False)
    # (cBPF program, flags) oldest first, read with ptrace


def parse_creds(text: str) -> Creds:
    """The credential lines of a /proc/PID/status text. Raises ValueError if one is
    missing or malformed (a kernel without them cannot be dumped safely)."""
    kv: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            kv[key] = value.strip()
    missing = [k for k in STATUS_KEYS if k not in kv]
    if missing:
        raise ValueError(f"no {', '.join(missing)} line")

    def four(key: str) -> tuple[int, int, int, int]:
        vals = [int(v) for v in kv[key].split()]
        if len(vals) != 4:
            raise ValueError(f"{key} line has {len(vals)} values, not 4")
        return vals[0], vals[1], vals[2], vals[3]

    return Creds(
        uid=four("Uid"), gid=four("Gid"), groups=tuple(int(g) for g in kv["Groups"].split()),
        cap_inh=int(kv["CapInh"], 16), cap_prm=int(kv["CapPrm"], 16),
        cap_eff=int(kv["CapEff"], 16), cap_bnd=int(kv["CapBnd"], 16),
        cap_amb=int(kv["CapAmb"], 16), no_new_privs=kv["NoNewPrivs"] == "1",
        seccomp_mode=int(kv["Seccomp"]), seccomp_filters=int(kv["Seccomp_filters"]))


def read_task_status(pid: int, tid: int, *, root: str = "/proc") -> str:
    return read_text(pid, root, "task", str(tid), "status")


def read_creds(pid: int, tid: int, *, root: str = "/proc") -> Creds:
    """Parse /proc/PID/task/TID/status into :class:`Creds`."""
    text = read_task_status(pid, tid, root=root)
    if not text.strip():
        raise NoSuchProcess(tid, "empty status")
    try:
        return parse_creds(text)
    except ValueError as exc:
        raise NotDumpable(f"/proc/{pid}/task/{tid}/status: {exc}") from None


def collect_creds(pid: int, tid: int, securebits: int, *, root: str = "/proc") -> Creds:
    """A traced, stopped task's credentials, securebits (read by the caller inside the
    task) and seccomp filters; refuses a task whose filters cannot all be read."""
    creds = read_creds(pid, tid, root=root)
    try:
        filters = seccomp_filters(tid) if creds.seccomp_mode == SECCOMP_MODE_FILTER else []
    except KernelError as exc:
        raise NotDumpable(f"cannot read the seccomp filters of thread {tid} of process "
                          f"{pid}: {exc}") from None
    if len(filters) != creds.seccomp_filters:
        raise NotDumpable(f"thread {tid} of process {pid} has {creds.seccomp_filters} seccomp "
                          f"filters but {len(filters)} could be read")
    return replace(creds, securebits=securebits, filters=filters)
