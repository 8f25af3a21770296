"""`ckpt show`: what an images directory holds (processes, threads, VMAs, fds, pages),
as text or JSON, like `crit show`. Reads images only; never touches a live process.

A dump of a process tree (Inventory.pids: the members in pre-order, root first) also
shows the tree (``tree``: ids, state, threads, a zombie's exit) and what its members
share (``shared``: open file descriptions inherited across fork, anonymous shared
memory, private memory shared copy-on-write at the dump)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict

from ckpt.errors import ImageError
from ckpt.images import ImageDir, image_chain
from ckpt.images.pagemap import Pagemap
from ckpt.images.pb import core_pb2
from ckpt.images.siginfo import was_stopped
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.ranges import intersect, total


def summarize(images_dir: str) -> dict[str, Any]:
    images = ImageDir.open(images_dir)
    inv = images.read_inventory()
    chain = image_chain(images)
    out: dict[str, Any] = {
        "images_dir": str(images.path),
        "inventory": MessageToDict(inv, preserving_proto_field_name=True),
        "parents": [shown_path(d.path) for d in chain[1:]],
        "processes": [],
    }
    entries = []
    for pid in inv.pids:
        entry = images.read_core(pid) if inv.kind == "dump" else None
        if entry is not None and entry.zombie and not images.exists("pagemap", pid):
            pagemap = Pagemap([], [])  # a zombie has no memory
        else:
            _, pagemap = images.read_pagemap(pid)
        out["processes"].append(_process(pid, entry, pagemap))
        if entry is not None:
            entries.append(entry)
    if len(inv.pids) > 1 and entries:
        out["tree"] = tree_rows(entries)
        out["shared"] = {"files": shared_files(entries), "memory": shared_memory(entries),
                         "cow_shared_bytes": inv.stats.cow_shared_bytes}
    return out


def shown_path(path: str | os.PathLike[str]) -> str:
    """``ck/3/../2/../1`` as ``ck/1``; as the real path where a symlink makes ".." go
    elsewhere than the text says."""
    norm = os.path.normpath(path)
    real = os.path.realpath(path)
    return norm if os.path.realpath(norm) == real else real


def _process(pid: int, entry: core_pb2.ProcessEntry | None,
             pagemap: Pagemap) -> dict[str, Any]:
    present, parent = pagemap.pages()
    proc: dict[str, Any] = {"pid": pid, "pages_here": present, "pages_in_parent": parent,
                            "pagemap_runs": pagemap.runs}
    if entry is None:
        return proc
    objects = _mapped_objects(entry)
    proc.update({
        "comm": entry.comm, "exe": entry.mm.exe, "cwd": entry.cwd,
        "stopped": was_stopped(entry),
        **({"zombie": exit_text(entry.exit_status)} if entry.zombie else {}),
        "threads": [{"tid": t.tid, "rip": t.regs.rip, "in_syscall": _syscall_nr(t),
                     "creds": _creds(t)} for t in entry.threads],
        "vmas": [{"start": v.start, "end": v.end, "prot": _prot(v.prot, v.shared),
                  "kind": core_pb2.Vma.Kind.Name(v.kind), "path": v.path,
                  "pages": _pages_in(v.start, v.end, pagemap)}
                 | ({"object": objects[(v.dev, v.inode)]} if (v.dev, v.inode) in objects
                    else {})
                 | ({"shm": {"shmid": v.shmid, "owner": v.shm_owner, "owner_start": v.shm_start}}
                    if v.shmid else {}) for v in entry.vmas],
        "fds": [_fd(fd, {f.id: f for f in entry.files}) for fd in entry.fds],
        "sigactions": len(entry.sigactions),
    })
    return proc


def _mapped_objects(entry: core_pb2.ProcessEntry) -> dict[tuple[int, int], str]:
    """How each mapped memfd or deleted file travels (ckpt.collect.mappedfiles), by the
    (Vma.dev, Vma.inode) of its VMAs."""
    fds: dict[int, list[int]] = {}
    for fd in entry.fds:
        fds.setdefault(fd.file_id, []).append(fd.fd)
    out = {}
    for o in entry.mapped_objects:
        if o.HasField("file_id"):
            out[(o.dev, o.inode)] = "the file of fd " + ", ".join(
                map(str, sorted(fds.get(o.file_id, []))))
        elif o.file.shared_pid:  # a tree: an earlier member carries it
            out[(o.dev, o.inode)] = f"process {o.file.shared_pid}'s (saved there)"
        else:
            out[(o.dev, o.inode)] = f"contents saved ({o.file.size} bytes)"
    return out


def _creds(t: core_pb2.ThreadCore) -> str:
    c = t.creds
    return (f"uid={c.uid},{c.euid},{c.suid},{c.fsuid} gid={c.gid},{c.egid},{c.sgid},{c.fsgid} "
            f"groups={','.join(map(str, c.groups)) or '-'} cap_eff={c.cap_eff:#x} "
            f"cap_prm={c.cap_prm:#x} seccomp={c.seccomp_mode}"
            f"{f' ({len(t.seccomp_filters)} filters)' if t.seccomp_filters else ''}"
            f"{' no_new_privs' if c.no_new_privs else ''}") if t.HasField("creds") else "none"


def _syscall_nr(t: core_pb2.ThreadCore) -> int | None:
    nr = t.regs.orig_rax
    return None if nr >= 1 << 63 else nr


def _prot(prot: int, shared: bool) -> str:
    return "".join(c if prot & b else "-" for c, b in (("r", 1), ("w", 2), ("x", 4))) + (
        "s" if shared else "p")


def _pages_in(start: int, end: int, pagemap: Pagemap) -> int:
    return total(intersect(pagemap.covered, [(start, end)])) // PAGE_SIZE


#: OpenFile fields that hold an fd kind's state (ckpt.collect.fdkinds), shown as its "state"
KIND_FIELDS = ("pipe", "unix_socket", "inet_socket", "eventfd", "epoll", "timerfd", "signalfd",
               "inotify", "memfd")


def _fd(fd: core_pb2.FdEntry, files: dict[int, core_pb2.OpenFile]) -> dict[str, Any]:
    f = files[fd.file_id]
    if f.shared_pid:  # nothing else of f is used (proto/core.proto, OpenFile 17-18)
        return {"fd": fd.fd, "file": fd.file_id, "cloexec": fd.cloexec,
                "shared_with": {"pid": f.shared_pid, "fd": f.shared_fd}}
    out = {"fd": fd.fd, "file": fd.file_id, "type": core_pb2.OpenFile.Type.Name(f.type),
           "path": f.path, "pos": f.pos, "flags": oct(f.flags), "cloexec": fd.cloexec}
    state: dict[str, Any] = {}
    for name in KIND_FIELDS:
        if f.HasField(name):
            state.update(MessageToDict(getattr(f, name)))
    if f.locks:
        state["locks"] = [MessageToDict(lock) for lock in f.locks]
    if f.external:
        state["external"] = f.external
    if f.owner:  # F_SETOWN (ckpt.collect.fdkinds.fown)
        state["owner"] = f"{('tid', 'pid', 'pgrp')[f.owner_type]} {f.owner}"
    if f.signal:
        state["signal"] = f.signal
    if state:
        out["state"] = state
    return out


def _state_text(state: dict[str, Any]) -> str:
    """A kind's state on one line: long bytes fields (base64 in JSON) as their length,
    and the ``data`` of nested messages too (a unix socket's queue, a memfd's chunks)."""
    parts = []
    for key, value in state.items():
        if isinstance(value, str) and len(value) > 40:
            value = _length(value)
        elif isinstance(value, list):
            value = [{k: _length(v) if k == "data" and len(v) > 40 else v
                      for k, v in item.items()} if isinstance(item, dict) else item
                     for item in value]
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _length(base64: str) -> str:
    return f"<{len(base64) * 3 // 4 - base64[-2:].count('=')} bytes>"


def render_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2)


def render_text(s: dict[str, Any]) -> str:
    inv = s["inventory"]
    stats = inv.get("stats", {})
    lines = [f"{s['images_dir']}: {inv.get('kind')} of pid {inv.get('root_pid')}, "
             f"tracker {inv.get('tracker')}, kernel {inv.get('kernel_release')}"]
    if s["parents"]:
        lines.append(f"  parents: {' <- '.join(s['parents'])}")
    precopied = int(stats.get("pages_precopied", 0))
    lines.append(f"  frozen {stats.get('frozen_ms', 0):.1f} ms, copy {stats.get('copy_ms', 0):.1f}"
                 f" ms, {int(stats.get('bytes_written', 0)) / 2**20:.2f} MiB stored"
                 + (f", {precopied} pages read before the freeze" if precopied else ""))
    if "tree" in s:
        lines += render_tree(s["tree"], s["shared"])
    for p in s["processes"]:
        lines.append(f"process {p['pid']} {p.get('comm', '')!r} exe={p.get('exe', '?')}"
                     + (" (stopped: restored stopped, until SIGCONT)" if p.get("stopped") else "")
                     + (f" (zombie: {p['zombie']})" if "zombie" in p else ""))
        lines.append(f"  pages: {p['pages_here']} here, {p['pages_in_parent']} in parent images"
                     f" ({p['pagemap_runs']} runs)")
        for t in p.get("threads", []):
            sc = f" in syscall {t['in_syscall']}" if t["in_syscall"] is not None else ""
            lines.append(f"  thread {t['tid']} rip={t['rip']:#x}{sc}")
            lines.append(f"    credentials: {t['creds']}")
        for v in p.get("vmas", []):
            lines.append(f"  vma {v['start']:#014x}-{v['end']:#014x} {v['prot']} "
                         f"{v['kind']:<12} {v['pages']:>7}p {v['path']}"
                         + (f" [{v['object']}]" if "object" in v else "")
                         + (f" [shared memory {v['shm']['shmid']} of {v['shm']['owner']}]"
                            if "shm" in v else ""))
        for f in p.get("fds", []):
            if "shared_with" in f:
                w = f["shared_with"]
                lines.append(f"  fd {f['fd']:>3} -> the open file of process {w['pid']} fd "
                             f"{w['fd']}{' cloexec' if f['cloexec'] else ''}")
                continue
            lines.append(f"  fd {f['fd']:>3} -> {f['path'] or f['type']} {f['type'].lower()} "
                         f"pos={f['pos']} flags={f['flags']}{' cloexec' if f['cloexec'] else ''}"
                         + (f" {_state_text(f['state'])}" if "state" in f else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- a tree


def exit_text(status: int) -> str:
    """A wait status as a person says it: ``exit 7``, ``killed by SIGTERM``."""
    if os.WIFEXITED(status):
        return f"exit {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}" + (" (core dumped)" if os.WCOREDUMP(status) else "")
    return f"wait status {status:#x}"


def _state(entry: core_pb2.ProcessEntry) -> str:
    return "zombie" if entry.zombie else "stopped" if was_stopped(entry) else "running"


def tree_rows(entries: Sequence[core_pb2.ProcessEntry]) -> list[dict[str, Any]]:
    """One row per member, in pre-order; ``depth``: how many of its ancestors are
    members (0 for the root)."""
    depth: dict[int, int] = {}
    rows = []
    for e in entries:
        depth[e.pid] = depth[e.ppid] + 1 if e.ppid in depth else 0
        rows.append({"pid": e.pid, "ppid": e.ppid, "pgid": e.pgid, "sid": e.sid,
                     "state": _state(e), "comm": e.comm, "threads": len(e.threads),
                     "depth": depth[e.pid]}
                    | ({"exit_status": e.exit_status, "exit": exit_text(e.exit_status)}
                       if e.zombie else {}))
    return rows


def shared_files(entries: Sequence[core_pb2.ProcessEntry]) -> list[dict[str, Any]]:
    """Open file descriptions several members hold: an OpenFile with ``shared_pid`` is
    the one of that member's fd ``shared_fd`` (a member earlier in pre-order, which may
    itself take it from an earlier one). Each with its type and path (from the first
    holder, which carries its state) and every holder's fds, in pre-order."""
    order = {e.pid: i for i, e in enumerate(entries)}
    by_pid = {e.pid: e for e in entries}
    fds: dict[tuple[int, int], list[int]] = {}  # (pid, file id) -> its fds
    for e in entries:
        for fd in e.fds:
            fds.setdefault((e.pid, fd.file_id), []).append(fd.fd)
    origin: dict[tuple[int, int], tuple[int, int]] = {}
    for e in entries:  # pre-order: a reference is resolved before it is used
        for f in e.files:
            key = (e.pid, f.id)
            if not f.shared_pid:
                origin[key] = key
                continue
            other = by_pid.get(f.shared_pid)
            file_id = next((d.file_id for d in other.fds if d.fd == f.shared_fd), 0) \
                if other is not None and order[f.shared_pid] < order[e.pid] else 0
            if (f.shared_pid, file_id) not in origin:
                raise ImageError(f"process {e.pid} open file {f.id}: shared with process "
                                 f"{f.shared_pid} fd {f.shared_fd}, which no member restored "
                                 "before it has")
            origin[key] = origin[(f.shared_pid, file_id)]
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for key, first in origin.items():
        groups.setdefault(first, []).append(key)
    out = []
    for (pid, file_id), holders in groups.items():
        if len(holders) < 2:
            continue
        f = next(f for f in by_pid[pid].files if f.id == file_id)
        out.append({"type": core_pb2.OpenFile.Type.Name(f.type), "path": f.path,
                    "state_in": pid,
                    "holders": [{"pid": p, "fds": sorted(fds.get((p, i), []))}
                                for p, i in holders]})
    return out


def shared_memory(entries: Sequence[core_pb2.ProcessEntry]) -> list[dict[str, Any]]:
    """Anonymous shared memory several members map (Vma.shmid): the owner, whose VMA at
    ``shm_start`` holds the pages, and every mapping, in pre-order."""
    groups: dict[int, dict[str, Any]] = {}
    for e in entries:
        for v in e.vmas:
            if not v.shmid:
                continue
            g = groups.setdefault(v.shmid, {"shmid": v.shmid, "owner": v.shm_owner,
                                            "owner_start": v.shm_start, "mappings": []})
            g["mappings"].append({"pid": e.pid, "start": v.start, "end": v.end,
                                  "pgoff": v.pgoff})
    return list(groups.values())


def _fds_text(fds: list[int]) -> str:
    return ("fd " if len(fds) == 1 else "fds ") + ",".join(map(str, fds)) if fds else "no fd"


def render_tree(rows: list[dict[str, Any]], shared: dict[str, Any]) -> list[str]:
    """The tree table, indented by depth, then what the members share."""
    pids = ["  " * r["depth"] + str(r["pid"]) for r in rows]
    width = max(len("PID"), *map(len, pids))
    head = f"  {'PID':<{width}}  {'PPID':>7} {'PGID':>7} {'SID':>7}  {'STATE':<8} THREADS  COMM"
    lines = [f"tree of {len(rows)} processes (pre-order):", head]
    for pid, r in zip(pids, rows, strict=True):
        lines.append(f"  {pid:<{width}}  {r['ppid']:>7} {r['pgid']:>7} {r['sid']:>7}  "
                     f"{r['state']:<8} {r['threads']:>7}  {r['comm']}"
                     + (f"  ({r['exit']})" if "exit" in r else ""))
    lines.append("shared between members:")
    for f in shared["files"]:
        holders = "; ".join(f"{h['pid']} {_fds_text(h['fds'])}" for h in f["holders"])
        path = f" {f['path']}" if f["path"] else ""
        lines.append(f"  open file {f['type'].lower()}{path}: {holders} "
                     f"(state saved with {f['state_in']})")
    for m in shared["memory"]:
        size = max((g["pgoff"] + g["end"] - g["start"] for g in m["mappings"]), default=0)
        maps = ", ".join(f"{g['pid']} at {g['start']:#x}" for g in m["mappings"])
        lines.append(f"  shared memory {m['shmid']} ({size // 1024} KiB): owner {m['owner']} "
                     f"at {m['owner_start']:#x}; mapped by {maps}")
    if not shared["files"] and not shared["memory"]:
        lines.append("  no open file or shared memory")
    cow = shared["cow_shared_bytes"] / 2**20
    lines.append(f"  shared copy-on-write at dump: {cow:.1f} MiB; restored as private copies: "
                 f"+{cow:.1f} MiB")
    return lines
