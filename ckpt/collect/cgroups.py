"""Cgroup membership: which cgroup of each hierarchy the process is in, recorded at dump
and joined again at restore (a restored process would otherwise land in ckpt's).

    /proc/PID/cgroup            4:memory:/app/web      hierarchy:controllers:path
    /proc/self/mountinfo        ... /sys/fs/cgroup/memory ... - cgroup cgroup rw,memory
                                ... /sys/fs/cgroup/unified ... - cgroup2 cgroup2 rw

Restore writes the stub's pid into ``<mount>/<path>/cgroup.procs`` of each hierarchy
where the image's cgroup is not ckpt's, before any thread is cloned (threads follow).
A cgroup missing here (its service ended with the dump, or another host) stops the
restore, naming it: made empty, it would lack the limits the process ran under (the image
does not hold them); create it with them and restore again. Hierarchies not mounted here
are named in the error, never skipped.

Threads in other cgroups than their process (a v1 cpu or cpuset cgroup per thread, a v2
threaded cgroup) are refused before the freeze (:func:`thread_refusals`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ckpt.collect.proc import proc_errors, proc_path
from ckpt.errors import RestoreError
from ckpt.images.checks import clean_path
from ckpt.images.pb import core_pb2 as pb


@dataclass(frozen=True)
class Membership:
    """One line of /proc/PID/cgroup."""

    hierarchy: int
    controllers: str
    path: str


def parse_proc_cgroup(text: str) -> list[Membership]:
    out = []
    for line in text.splitlines():
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if sep and sep2:
            out.append(Membership(int(hierarchy), controllers, path))
    return out


def read_cgroups(pid: int, root: str = "/proc") -> list[Membership]:
    with proc_errors(pid, "cgroup"), open(proc_path(root, pid, "cgroup")) as f:
        return parse_proc_cgroup(f.read())


@dataclass(frozen=True)
class Mount:
    """A cgroup filesystem mounted at ``point``, showing its hierarchy from ``root``."""

    point: str
    root: str
    v2: bool
    options: frozenset[str]  # super options: controllers, name=X


def parse_cgroup_mounts(mountinfo: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts of a /proc/PID/mountinfo."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        out.append(Mount(point=_unescape(fields[4]), root=_unescape(fields[3]),
                         v2=tail[0] == "cgroup2", options=frozenset(tail[2].split(","))))
    return out


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")


def cgroup_dir(m: Membership | pb.Cgroup, mounts: Sequence[Mount]) -> str | None:
    """Where cgroup ``m`` is in this mount namespace, or None (hierarchy not mounted, or
    mounted from below the cgroup)."""
    wanted = set(m.controllers.split(",")) if m.controllers else set()
    for mount in mounts:
        if (m.hierarchy == 0) != mount.v2 or not wanted <= mount.options:
            continue
        root = mount.root.rstrip("/")
        if m.path != root and not m.path.startswith(root + "/"):
            continue
        return os.path.join(mount.point, m.path[len(root):].lstrip("/"))
    return None


def join_cgroups(pid: int, cgroups: Sequence[pb.Cgroup]) -> None:
    """Move process ``pid`` (a stub with one thread) into the image's cgroups."""
    if not cgroups:
        return  # an image of an older ckpt
    here = {(m.hierarchy, m.controllers): m.path for m in read_cgroups(pid)}
    with open("/proc/self/mountinfo") as f:
        mounts = parse_cgroup_mounts(f.read())
    for cg in cgroups:
        name = f"{cg.controllers or 'cgroup2'}:{cg.path}"
        if here.get((cg.hierarchy, cg.controllers)) == cg.path:
            continue
        if clean_path(cg.path) is not None:  # it names a directory a pid is written into
            raise RestoreError(f"cgroup {name} in the image is not a plain path")
        where = cgroup_dir(cg, mounts)
        if where is None:
            raise RestoreError(f"cgroup {name} of the dumped process: that hierarchy is "
                               "not mounted here")
        if not os.path.isdir(where):
            raise RestoreError(f"cgroup {name} of the dumped process does not exist here: "
                               "create it (with its limits) and restore again")
        try:
            with open(os.path.join(where, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except OSError as exc:
            raise RestoreError(f"cannot put the process in cgroup {name}: "
                               f"{exc.strerror or exc}") from None


def cgroups_to_pb(found: Sequence[Membership]) -> list[pb.Cgroup]:
    return [pb.Cgroup(hierarchy=m.hierarchy, controllers=m.controllers, path=m.path)
            for m in found]


def read_thread_cgroups(pid: int, tids: Sequence[int], root: str = "/proc",
                        ) -> list[tuple[int, list[Membership]]]:
    """(tid, its cgroups) of each thread still there."""
    out = []
    for tid in tids:
        try:
            with open(proc_path(root, pid, "task", str(tid), "cgroup")) as f:
                out.append((tid, parse_proc_cgroup(f.read())))
        except FileNotFoundError:
            continue
    return out


def thread_refusals(pid: int, threads: Sequence[tuple[int, Sequence[Membership]]],
                    ) -> list[str]:
    """Threads in another cgroup than the process's leader (pure): restore puts every
    thread in the leader's."""
    lead = dict(threads).get(pid)
    if lead is None:
        return []
    out = []
    for tid, found in threads:
        other = sorted(set(found) - set(lead), key=lambda m: m.hierarchy)
        if tid != pid and other:
            m = other[0]
            out.append(f"thread {tid} of process {pid} is in cgroup "
                       f"{m.controllers or 'cgroup2'}:{m.path}, not its process's: "
                       "not supported yet")
    return out
