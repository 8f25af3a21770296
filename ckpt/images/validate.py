"""Every decoded field checked at the image boundary.

A framed entry whose CRC is right can still hold values no dump ever writes: a file
damaged and its checksum fixed, an image written by a buggy or hostile tool. Whatever
reads images (restore, show, the next pass) may then trust each field, so a bad value
is refused here, as an ImageError naming the file and the field:

    core-42.img: corrupted (vmas[3].kind = 99: not a Vma.Kind)

Two tables say what is valid:

    FIELDS   message type -> field name -> check of one value (each element of a
             repeated field), in ckpt/images/fields.py; an enum field without a row
             must be one of its enum's values, a double must be finite and not
             negative, a string at most PATH_MAX bytes without NUL
    RULES    message type -> checks across fields (start < end, ids that refer to
             each other, no duplicates)

Nested messages are walked, so a row for ``Vma`` covers every VMA of a core image and
of a predump's vmas image alike. Fields that any value fits (registers, signal masks,
handler addresses) have no row: a process restored with a garbage register crashes the
way it would have crashed anyway, it does not crash ckpt. tests/test_image_fuzz.py lists
them (FREE) and fails on any field of any message that has neither a check nor a place
there. The checks themselves are ckpt/images/checks.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from ckpt.errors import ImageError
from ckpt.images.checks import (
    NSIG,
    USER_END,
    Check,
    clean_path,
    finite,
    text,
)
from ckpt.images.fields import (
    DELETED,
    FIELDS,
    MAX_GROUPS,
    S64_MAX,
    SCHED_FIFO,
    SCHED_RR,
    VSYSCALL,
)
from ckpt.images.pb import core_pb2 as core
from ckpt.images.pb import image_pb2 as img
from ckpt.kernel import prctl
from ckpt.kernel.sched import SCHED_RESET_ON_FORK
from ckpt.kernel.sys import PAGE_SIZE
from ckpt.kernel.timers import SIGEV_NONE, SIGEV_THREAD_ID, cpu_clock_pid

Problem = tuple[str, Any, str]  # (field, value, why)


# --------------------------------------------------------------------------- rules


def _ordered(pairs: Iterable[tuple[str, int, int]]) -> Iterator[Problem]:
    for field, lo, hi in pairs:
        if lo > hi:
            yield field, lo, f"after its end {hi:#x}"


def _unique(field: str, values: Iterable[Any]) -> Iterator[Problem]:
    seen = set()
    for i, v in enumerate(values):
        if v in seen:
            yield f"{field}[{i}]", v, "a duplicate"
        seen.add(v)


def _inventory(m: img.Inventory) -> Iterator[Problem]:
    if m.root_pid not in m.pids:
        yield "root_pid", m.root_pid, "not among pids"
    yield from _unique("pids", m.pids)


def _whole_vma(m: img.WholeVmaCopy) -> Iterator[Problem]:
    if m.start >= m.end:
        yield "start", m.start, f"not below end {m.end:#x}"


def _vma(m: core.Vma) -> Iterator[Problem]:
    if m.kind == core.Vma.VSYSCALL:
        if (m.start, m.end) != VSYSCALL:
            yield "start", m.start, "not the vsyscall page"
        return
    if m.start % PAGE_SIZE or m.end % PAGE_SIZE or not m.start < m.end <= USER_END:
        yield "start", m.start, f"{m.start:#x}-{m.end:#x} is not a page-aligned range of " \
                                f"the user address space"


def _pagemap_runs(m: img.PagemapRuns) -> Iterator[Problem]:
    if not len(m.vaddr) == len(m.nr_pages) == len(m.flags):
        yield "vaddr", len(m.vaddr), "run arrays of different lengths"
        return
    for i, (vaddr, n) in enumerate(zip(m.vaddr, m.nr_pages, strict=True)):
        if vaddr % PAGE_SIZE or n == 0 or vaddr + n * PAGE_SIZE > USER_END:
            yield f"vaddr[{i}]", vaddr, f"a run of {n} pages outside the user address space"
            return
    bad = set(m.flags) - {img.PRESENT, img.IN_PARENT}
    if bad:
        yield "flags", min(bad), "not a PageFlags value"


def _mm(m: core.MmFields) -> Iterator[Problem]:
    yield from _ordered([("start_code", m.start_code, m.end_code),
                         ("start_data", m.start_data, m.end_data),
                         ("start_brk", m.start_brk, m.brk),
                         ("arg_start", m.arg_start, m.arg_end),
                         ("env_start", m.env_start, m.env_end)])


def _sigaction(m: core.SigAction) -> Iterator[Problem]:
    if m.signo in (9, 19):
        yield "signo", m.signo, "SIGKILL and SIGSTOP have no action"


def _rlimit(m: core.Rlimit) -> Iterator[Problem]:
    if m.cur > m.max:
        yield "cur", m.cur, f"above the hard limit {m.max}"


def _open_file(m: core.OpenFile) -> Iterator[Problem]:
    if m.type == core.OpenFile.REGULAR and not m.path.startswith("/"):
        yield "path", m.path, "not an absolute path"
    if m.type == core.OpenFile.INHERITED and m.inherit_fd not in (0, 1, 2):
        yield "inherit_fd", m.inherit_fd, "not 0, 1 or 2"
    if m.type == core.OpenFile.PIPE and m.pipe.fifo and not m.path.startswith("/"):
        yield "path", m.path, "not an absolute path (a FIFO's)"
    yield from _unique("inotify.watches.wd", (w.wd for w in m.inotify.watches))
    if m.type == core.OpenFile.GHOST and (why := clean_path(m.path.removesuffix(DELETED))):
        yield "path", m.path, f"{why} (a deleted file's: restore makes it in its directory)"
    for i, chunk in enumerate(m.memfd.data):
        if chunk.offset + len(chunk.data) > m.size:
            yield f"memfd.data[{i}].offset", chunk.offset, f"data past the file's size {m.size}"
    if m.timerfd.clock_ns + m.timerfd.value_ns > S64_MAX:
        yield "timerfd.value_ns", m.timerfd.value_ns, "past the largest time"
    if m.locks and m.type not in (core.OpenFile.REGULAR, core.OpenFile.DEV_NULL):
        yield "locks", len(m.locks), "on a file a restore does not reopen by path"
    for i, lock in enumerate(m.locks):
        if lock.start + lock.length > S64_MAX:
            yield f"locks[{i}].length", lock.length, "past the largest file offset"


def _unix_name(name: bytes) -> str | None:
    """An abstract name (a NUL, then any bytes) or an absolute path without NUL."""
    if not name or name.startswith(b"\0"):
        return None
    if not name.startswith(b"/"):
        return "neither an abstract name nor an absolute path"
    return "a path with a NUL byte" if b"\0" in name else None


def _unix_socket(m: core.UnixSocket) -> Iterator[Problem]:
    names = [("name", m.name), ("peer_name", m.peer_name)]
    names += [(f"queue[{i}].sender", q.sender) for i, q in enumerate(m.queue)]
    for field, name in names:
        why = _unix_name(name)
        if why:
            yield field, name, why
    if m.state == 10 and m.type == 2:
        yield "state", m.state, "a listening dgram socket"


def _sched(m: core.Sched) -> Iterator[Problem]:
    realtime = m.policy & ~SCHED_RESET_ON_FORK in (SCHED_FIFO, SCHED_RR)
    if realtime != (m.priority > 0):
        yield "priority", m.priority, f"not a priority of policy {m.policy:#x}"


def _pipe(m: core.PipeFile) -> Iterator[Problem]:
    held = len(m.data) + sum(map(len, m.packets))
    if held > m.size:
        yield "size", m.size, f"less than the {held} bytes the pipe holds"
    if m.packets and m.data:
        yield "data", len(m.data), "bytes besides packets"


def _inet(m: core.InetSocket) -> Iterator[Problem]:
    size = 4 if m.family == 2 else 16
    if (m.type, m.protocol) not in ((1, 6), (2, 17)):
        yield "protocol", m.protocol, f"not the protocol of socket type {m.type}"
    for name in ("local", "peer"):
        if m.HasField(name) and len(getattr(m, name).addr) != size:
            yield f"{name}.addr", getattr(m, name).addr, f"not {size} bytes (family {m.family})"
    for i, g in enumerate(m.memberships):
        want = 4 if g.family == 2 else 16
        if want > size or len(g.group) != want or any(len(s) != want for s in g.sources):
            yield f"memberships[{i}].group", g.group, "not an address of its family"
        if len(g.sources) > 1024:
            yield f"memberships[{i}].sources", len(g.sources), "more than 1024 sources"


def _process(m: core.ProcessEntry) -> Iterator[Problem]:
    if m.zombie:  # a tree's dead member: ids, name, wait status and its credentials only
        if len(m.threads) != 1:
            yield "threads", len(m.threads), "not the one a zombie's credentials are in"
        for th in m.threads[:1]:
            if th.tid != m.pid:
                yield "threads[0].tid", th.tid, f"not the zombie {m.pid}"
            if not th.HasField("creds"):
                yield "threads[0].creds", "", "missing: a zombie would come back as root"
            elif len(th.creds.groups) > MAX_GROUPS:
                yield "threads[0].creds.groups", len(th.creds.groups), \
                    f"more than {MAX_GROUPS} groups"
            extra = sorted({f.name for f, _ in th.ListFields()} - {"tid", "creds"})
            if extra:
                yield f"threads[0].{extra[0]}", "", "a zombie's thread has only its credentials"
        for name in ("vmas", "files", "fds", "cgroups"):
            if getattr(m, name):
                yield name, len(getattr(m, name)), "a zombie has none"
        if not 0 <= m.exit_status <= 0xFFFF:
            yield "exit_status", m.exit_status, "not a wait status"
        return
    if not m.threads:
        yield "threads", 0, "no threads"
    elif m.threads[0].tid != m.pid:
        yield "threads[0].tid", m.threads[0].tid, f"the leader is not the process {m.pid}"
    yield from _unique("threads.tid", (t.tid for t in m.threads))
    for i, th in enumerate(m.threads):
        yield from _thread_creds(f"threads[{i}]", th)
    yield from _unique("sigactions.signo", (a.signo for a in m.sigactions))
    yield from _unique("rlimits.resource", (r.resource for r in m.rlimits))
    yield from _unique("itimers.which", (t.which for t in m.itimers))
    yield from _posix_timers(m)
    yield from _settings("settings", m.settings, prctl.Scope.PROCESS)
    for i, th in enumerate(m.threads):
        yield from _settings(f"threads[{i}].settings", th.settings, prctl.Scope.THREAD)
    yield from _unique("files.id", (f.id for f in m.files))
    yield from _unique("fds.fd", (f.fd for f in m.fds))
    ids = {f.id for f in m.files}
    tids = {t.tid for t in m.threads}
    for i, f in enumerate(m.files):  # F_OWNER_PGRP 2: the process group; else a thread
        # a process owner may be another member of a tree: checked by the restore
        if f.owner and f.owner_type != 1 and f.owner not in ({m.pgid} if f.owner_type == 2
                                                             else tids):
            yield f"files[{i}].owner", f.owner, "not the process, its threads or its group"
    for i, fd in enumerate(m.fds):
        if fd.file_id not in ids:
            yield f"fds[{i}].file_id", fd.file_id, "no such file"
    numbers = {fd.fd for fd in m.fds}
    for i, f in enumerate(m.files):
        for k, w in enumerate(f.epoll.watches):
            if w.tfd not in numbers:
                yield f"files[{i}].epoll.watches[{k}].tfd", w.tfd, "not an fd of the process"
    end = 0
    for i, v in enumerate(m.vmas):
        if v.start < end:
            yield f"vmas[{i}].start", v.start, "overlaps or precedes the VMA before it"
        end = v.end
    yield from _guards(m)
    yield from _mapped(m)
    if m.HasField("deleted_cwd") and not m.cwd.endswith(" (deleted)"):
        yield "cwd", m.cwd, "not a deleted directory, yet deleted_cwd is set"


def _mapped(m: core.ProcessEntry) -> Iterator[Problem]:
    """Mapped memfds and deleted files: each its own, a memfd or deleted file."""
    yield from _unique("mapped_objects.inode", ((o.dev, o.inode) for o in m.mapped_objects))
    types = {f.id: f.type for f in m.files}
    made = (core.OpenFile.MEMFD, core.OpenFile.GHOST)
    for i, o in enumerate(m.mapped_objects):
        if o.HasField("file_id") and types.get(o.file_id) not in made:
            yield f"mapped_objects[{i}].file_id", o.file_id, "no memfd or deleted file"
        elif not o.HasField("file_id") and o.file.type not in made:
            yield f"mapped_objects[{i}].file.type", o.file.type, "not MEMFD or GHOST"


def _guards(m: core.ProcessEntry) -> Iterator[Problem]:
    """Guard regions: in address order, each inside one VMA."""
    end = 0
    for i, g in enumerate(m.guard_regions):
        if g.start < end or g.start >= g.end:
            yield f"guard_regions[{i}].start", g.start, "not after the one before, or empty"
        elif not any(v.start <= g.start and g.end <= v.end for v in m.vmas):
            yield f"guard_regions[{i}].start", g.start, "not inside one VMA"
        end = g.end


def _posix_timers(m: core.ProcessEntry) -> Iterator[Problem]:
    yield from _unique("posix_timers.id", (t.id for t in m.posix_timers))
    tids = {th.tid for th in m.threads}
    for i, t in enumerate(m.posix_timers):
        if t.notify != SIGEV_NONE and not 1 <= t.signo <= NSIG:
            yield f"posix_timers[{i}].signo", t.signo, "not a signal"
        if bool(t.notify & SIGEV_THREAD_ID) != (t.notify_tid in tids):
            yield f"posix_timers[{i}].notify_tid", t.notify_tid, "not a thread it signals"
        if t.clock < 0 and cpu_clock_pid(t.clock) not in tids | {0}:
            yield f"posix_timers[{i}].clock", t.clock, "the CPU clock of another process"


def _settings(where: str, settings: Iterable[core.Setting], scope: prctl.Scope,
              ) -> Iterator[Problem]:
    items = list(settings)
    yield from _unique(f"{where}.name", (s.name for s in items))
    for k, s in enumerate(items):
        row = prctl.BY_NAME.get(s.name)
        if row is not None and row.scope != scope:
            yield f"{where}[{k}].name", s.name, f"not a per-{scope.value} setting"
        if row is not None and not 0 <= s.value <= row.top:
            yield f"{where}[{k}].value", s.value, f"not in 0..{row.top} for {s.name}"


def _thread_creds(where: str, th: core.ThreadCore) -> Iterator[Problem]:
    """Without credentials a thread would come back as root; filter mode without a
    filter would come back unfiltered."""
    if not th.HasField("creds"):
        yield f"{where}.creds", "", "missing (dumped by an older ckpt): not restored as root"
        return
    if len(th.creds.groups) > MAX_GROUPS:
        yield f"{where}.creds.groups", len(th.creds.groups), f"more than {MAX_GROUPS} groups"
    if th.creds.seccomp_mode == 2 and not th.seccomp_filters:
        yield f"{where}.seccomp_filters", 0, "none in seccomp filter mode"
    for k, f in enumerate(th.seccomp_filters):
        if not f.program:
            yield f"{where}.seccomp_filters[{k}].program", 0, "an empty cBPF program"


RULES: dict[type[Message], Callable[[Any], Iterator[Problem]]] = {
    img.Inventory: _inventory, img.WholeVmaCopy: _whole_vma, img.PagemapRuns: _pagemap_runs,
    core.Vma: _vma, core.MmFields: _mm, core.SigAction: _sigaction, core.Rlimit: _rlimit,
    core.OpenFile: _open_file, core.PipeFile: _pipe, core.ProcessEntry: _process,
    core.UnixSocket: _unix_socket, core.Sched: _sched,
    core.InetSocket: _inet,
}


# --------------------------------------------------------------------------- walk


def validate(name: str, *msgs: Message) -> None:
    """Raise ImageError naming ``name`` (the file) and the first field out of range of
    its entries ``msgs``."""
    for i, msg in enumerate(msgs):
        for field, value, why in problems(msg):
            shown = repr(value)
            if len(shown) > 40:
                shown = shown[:37] + "..."
            entry = f"entry {i} " if len(msgs) > 1 else ""
            raise ImageError(f"{name}: corrupted ({entry}{field} = {shown}: {why})")


def problems(msg: Message, prefix: str = "") -> Iterator[Problem]:
    """Every field of ``msg`` (and of its nested messages) out of range."""
    checks = FIELDS.get(type(msg), {})
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        where = prefix + fd.name
        repeated = fd.is_repeated
        if fd.message_type is not None:
            subs = list(enumerate(value)) if repeated else (
                [(None, value)] if msg.HasField(fd.name) else [])
            for i, sub in subs:
                yield from problems(sub, f"{where}." if i is None else f"{where}[{i}].")
            continue
        check = checks.get(fd.name) or _default(fd)
        if check is None:
            continue
        for i, v in enumerate(value) if repeated else [(None, value)]:
            if (why := check(v)) is not None:
                yield (where if i is None else f"{where}[{i}]"), v, why
    rule = RULES.get(type(msg))
    if rule is not None:
        for field, value, why in rule(msg):
            yield prefix + field, value, why


def _default(fd: Any) -> Check | None:
    if fd.enum_type is not None:
        return _enum(fd.enum_type)
    if fd.type == FieldDescriptor.TYPE_DOUBLE:
        return finite
    if fd.type == FieldDescriptor.TYPE_STRING:
        return text()
    return None


def _enum(desc: EnumDescriptor) -> Check:
    owner = f"{desc.containing_type.name}." if desc.containing_type else ""
    return lambda v: None if v in desc.values_by_number else f"not a {owner}{desc.name}"
