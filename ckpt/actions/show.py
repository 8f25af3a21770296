"""`ckpt show`: what an images directory holds (processes, threads, VMAs, fds, pages),
as text or JSON, like `crit show`. Reads images only; never touches a live process."""

from __future__ import annotations

import json
import os
from typing import Any

from google.protobuf.json_format import MessageToDict

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
    for pid in inv.pids:
        entry = images.read_core(pid) if inv.kind == "dump" else None
        _, pagemap = images.read_pagemap(pid)
        out["processes"].append(_process(pid, entry, pagemap))
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
        "threads": [{"tid": t.tid, "rip": t.regs.rip, "in_syscall": _syscall_nr(t),
                     "creds": _creds(t)} for t in entry.threads],
        "vmas": [{"start": v.start, "end": v.end, "prot": _prot(v.prot, v.shared),
                  "kind": core_pb2.Vma.Kind.Name(v.kind), "path": v.path,
                  "pages": _pages_in(v.start, v.end, pagemap)}
                 | ({"object": objects[(v.dev, v.inode)]} if (v.dev, v.inode) in objects
                    else {}) for v in entry.vmas],
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
    for p in s["processes"]:
        lines.append(f"process {p['pid']} {p.get('comm', '')!r} exe={p.get('exe', '?')}"
                     + (" (stopped: restored stopped, until SIGCONT)" if p.get("stopped") else ""))
        lines.append(f"  pages: {p['pages_here']} here, {p['pages_in_parent']} in parent images"
                     f" ({p['pagemap_runs']} runs)")
        for t in p.get("threads", []):
            sc = f" in syscall {t['in_syscall']}" if t["in_syscall"] is not None else ""
            lines.append(f"  thread {t['tid']} rip={t['rip']:#x}{sc}")
            lines.append(f"    credentials: {t['creds']}")
        for v in p.get("vmas", []):
            lines.append(f"  vma {v['start']:#014x}-{v['end']:#014x} {v['prot']} "
                         f"{v['kind']:<12} {v['pages']:>7}p {v['path']}"
                         + (f" [{v['object']}]" if "object" in v else ""))
        for f in p.get("fds", []):
            lines.append(f"  fd {f['fd']:>3} -> {f['path'] or f['type']} {f['type'].lower()} "
                         f"pos={f['pos']} flags={f['flags']}{' cloexec' if f['cloexec'] else ''}"
                         + (f" {_state_text(f['state'])}" if "state" in f else ""))
    return "\n".join(lines)
