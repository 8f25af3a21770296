"""Corrupt images whose framing and CRCs are right: a clean error, never "internal error".

A mutation fuzzer over real images (a predump and an incremental dump on top of it):
each mutant decodes one image file, sets one field to a hostile value (out of any
range a dump writes: 2^64-1, -5, NaN, a 4000-byte name, a NUL, enum 99, ...), encodes it
again with valid framing and CRCs, and runs `ckpt show` and `ckpt restore --new-pid`
in-process on it, plus the file's typed reader. Each must either succeed or fail with
one `Error:` line naming the file, never `internal error` or a traceback; and restore
must refuse every out-of-range value before it forks, unless the field takes any value
(FREE: registers, masks, handler addresses...). The fork itself is replaced by a marker,
so a mutant costs milliseconds. Deterministic: seed 9.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import Bins, Harness, assert_one_error_line, needs_root, run_ckpt, wait_for_lines
from google.protobuf.message import Message

from ckpt.cli import main
from ckpt.errors import ImageError
from ckpt.images import ImageDir
from ckpt.images.fields import FIELDS
from ckpt.images.framing import decode_payloads, encode_entries, parse_entry
from ckpt.images.imagedir import KINDS, ImageKind
from ckpt.images.pb import core_pb2 as core
from ckpt.images.pb import image_pb2 as img
from ckpt.images.validate import RULES
from ckpt.restore.stub import Stub

SEED = 9
MUTANTS = 300

# (message, field) that take any value: a mutant there may reach the fork
FREE = {
    *(("GpRegs", name) for name in core.GpRegs.DESCRIPTOR.fields_by_name
      if name not in ("cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base")),
    ("ThreadCore", "sigmask"), ("ThreadCore", "xstate"),
    *(("SigAction", name) for name in ("handler", "flags", "restorer", "mask")),
    ("Rlimit", "max"), ("Rlimit", "cur"),  # cur: fine below an infinite max
    ("ProcessEntry", "personality"), ("Rseq", "signature"),
    ("Rseq", "flags"), ("SigAltStack", "flags"), ("Vma", "dev"), ("Vma", "inode"),
    ("OpenFile", "flags"), ("OpenFile", "mode"), ("OpenFile", "mtime_ns"),
    ("OpenFile", "dev"), ("OpenFile", "inode"),
    *(("DumpStats", f.name) for f in img.DumpStats.DESCRIPTOR.fields
      if f.type != f.TYPE_DOUBLE and f.message_type is None),
    ("TrackerState", "start_time"), ("TrackerState", "uffd_inode"),
    ("ProcessEntry", "cwd_dev"), ("ProcessEntry", "cwd_inode"), ("OpenFile", "object"),
    ("SysvShm", "key"), ("SysvShm", "uid"), ("SysvShm", "gid"), ("SysvShm", "cuid"),
    ("SysvShm", "cgid"),
    ("ProcessEntry", "loginuid"),  # 2^32-1: unset
    ("Sched", "nice"),  # -5 is a nice value too (out-of-range ones are refused)
    # fd kinds: values the kernel takes as they are (epoll_ctl keeps unknown event bits),
    # or identities only compared
    ("EpollWatch", "events"), ("EpollWatch", "data"), ("SignalFd", "mask"),
    ("InotifyWatch", "dev"), ("InotifyWatch", "inode"), ("MemFd", "atime_ns"),
    ("InetAddress", "scope_id"), ("UnixSocket", "inode"), ("UnixSocket", "peer"),
    ("PosixTimer", "value"),  # sigev_value: the program's
    # mapped memfds and deleted files, a deleted cwd: identities only compared, times
    ("MappedObject", "dev"), ("MappedObject", "inode"), ("DeletedDir", "parent_dev"),
    ("DeletedDir", "parent_inode"), ("DeletedDir", "atime_ns"), ("DeletedDir", "mtime_ns"),
    # a tree: a shmem object's identity, only compared; any wait status a zombie can have
    ("Vma", "shmid"), ("ProcessEntry", "exit_status"),
}
# (message, field) whose values are checked by a rule of ckpt.images.validate.RULES, across
# fields, rather than a row of FIELDS
BY_RULE = {
    ("Vma", "start"), ("Vma", "end"),  # _vma: a page-aligned range of user space
    ("FileChunk", "data"),  # _open_file: inside the file's size
    ("MappedObject", "file_id"),  # _mapped: an open file of the process, a memfd or ghost
    ("PagemapRuns", "vaddr"), ("PagemapRuns", "nr_pages"), ("PagemapRuns", "flags"),
    ("Setting", "value"),  # _settings: in its row's range
    ("PosixTimer", "signo"),  # _posix_timers: a signal unless SIGEV_NONE
}
RESTORE_READS = {"inventory", "core", "pagemap"}  # the other kinds serve the next pass


@dataclass(frozen=True)
class Slot:
    """One scalar in one entry of one image file: entry i, then a path of (field, index)."""

    file: Path
    entry: int
    path: tuple[tuple[str, int | None], ...]
    owner: str  # message type holding the field
    kind: str  # protobuf type name of the field: "uint64", "string", "enum", ...

    def describe(self) -> str:
        where = ".".join(f"{n}[{i}]" if i is not None else n for n, i in self.path)
        return f"{self.file.parent.name}/{self.file.name} entry {self.entry} {where}"


TYPE_NAMES = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 8: "bool",
              9: "string", 12: "bytes", 13: "uint32", 14: "enum", 17: "sint32", 18: "sint64"}

HOSTILE: dict[str, list[Any]] = {
    "double": [math.nan, math.inf, -1.0],
    "int64": [-1, 2**63 - 1], "uint64": [2**64 - 1, 2**63 + 5],
    "int32": [-5, 2**31 - 1], "uint32": [2**32 - 1], "enum": [99],
    "string": ["x" * 4000, "a\0b", "../" * 1500, "/" + "y" * 300],
    "bytes": [b"\x01" * 3, b"\xff" * 5000],
}


def kind_of(name: str) -> ImageKind:
    return next(k for k in KINDS.values()
                if re.fullmatch(re.escape(k.template).replace(r"\{pid\}", r"\d+"), name))


def decode(path: Path) -> tuple[int, list[Message]]:
    """(kind-magic, entries) of an image file; entries after the first are of the
    kind's last message type (a pagemap: PagemapHead, then PagemapRuns)."""
    kind = kind_of(path.name)
    payloads = decode_payloads(path.read_bytes(), kind.magic, str(path))
    return kind.magic, [parse_entry(kind.messages[min(i, len(kind.messages) - 1)], p,
                                    str(path), i) for i, p in enumerate(payloads)]


def slots(file: Path, entry: int, msg: Message,
          path: tuple[tuple[str, int | None], ...] = ()) -> Iterator[Slot]:
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        indices: list[int | None] = list(range(len(value))) if fd.is_repeated else [None]
        for i in indices:
            at = (*path, (fd.name, i))
            if fd.message_type is not None:
                sub = value[i] if i is not None else value
                if i is not None or msg.HasField(fd.name):
                    yield from slots(file, entry, sub, at)
            elif TYPE_NAMES.get(fd.type) in HOSTILE:
                yield Slot(file, entry, at, msg.DESCRIPTOR.name, TYPE_NAMES[fd.type])


def mutate(msg: Message, path: tuple[tuple[str, int | None], ...], value: Any) -> None:
    *outer, (name, index) = path
    for field, i in outer:
        msg = getattr(msg, field)[i] if i is not None else getattr(msg, field)
    if index is None:
        setattr(msg, name, value)
    else:
        getattr(msg, name)[index] = value


class Reached(BaseException):
    """Restore got past validation to the fork."""


@dataclass
class Outcome:
    ok: bool
    reached_fork: bool
    stderr: str
    code: int


def invoke(args: list[str]) -> Outcome:
    try:
        res = CliRunner().invoke(main, args, catch_exceptions=False)
    except Reached:
        return Outcome(True, True, "", 0)
    return Outcome(res.exit_code == 0, False, res.stderr, res.exit_code)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, bins: Bins) -> Iterator[tuple[Path, int]]:
    """c/1 (predump, compare tracker) <- c/2 (incremental dump) of a counter."""
    tmp = tmp_path_factory.mktemp("fuzz")
    harness = Harness(tmp)
    try:
        out = tmp / "out.txt"
        proc = harness.launch([bins.counter_dyn], out)
        wait_for_lines(out, 3)
        c = tmp / "c"
        res = run_ckpt("predump", "-t", str(proc.pid), "-D", c / "1", "--track", "compare")
        assert res.returncode == 0, res.describe()
        harness.dump_and_reap(proc, c / "2", "--prev-images-dir", "../1")
        yield c, proc.pid
    finally:
        harness.cleanup()


def readers(d: ImageDir, pid: int) -> dict[str, Callable[[], object]]:
    return {"inventory": d.read_inventory, "core": lambda: d.read_core(pid),
            "pagemap": lambda: d.read_pagemap(pid), "vmas": lambda: d.read_vmas(pid),
            "tracker": lambda: d.read_tracker(pid), "digests": lambda: d.read_digests(pid)}


def test_every_field_is_checked_or_free() -> None:
    """Each scalar field of each image message has a check (a FIELDS row, a rule, or the
    default of its type: enum values, finite doubles, strings without NUL) or is FREE:
    a field added without one fails here, not in a restore as 'internal error'."""
    unchecked = []
    for module in (core, img):
        for name, desc in module.DESCRIPTOR.message_types_by_name.items():
            rows = FIELDS.get(getattr(module, name), {})
            for f in desc.fields:
                if (f.message_type is not None or f.name in rows or f.enum_type is not None
                        or f.type in (f.TYPE_DOUBLE, f.TYPE_STRING, f.TYPE_BOOL)
                        or (name, f.name) in FREE | BY_RULE):
                    continue
                unchecked.append(f"{name}.{f.name}")
    assert not unchecked, f"no check and not FREE: {', '.join(unchecked)}"
    ruled = {getattr(module, name) for module in (core, img) for name, _ in BY_RULE
             if name in module.DESCRIPTOR.message_types_by_name}
    # FileChunk's rule is OpenFile's, Setting's, PosixTimer's and MappedObject's
    # ProcessEntry's
    assert not ruled - set(RULES) - {core.FileChunk, core.Setting, core.PosixTimer,
                                     core.MappedObject}
    stale = {(m, n) for m, n in FREE | BY_RULE
             if not any(m in mod.DESCRIPTOR.message_types_by_name and
                        n in mod.DESCRIPTOR.message_types_by_name[m].fields_by_name
                        for mod in (core, img))}
    assert not stale, f"FREE or BY_RULE names no field: {stale}"


@needs_root
def test_mutants_fail_cleanly(chain: tuple[Path, int], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    src, pid = chain
    work = tmp_path / "c"
    shutil.copytree(src, work)
    monkeypatch.delenv("CKPT_DEBUG", raising=False)

    def no_fork(*_: object, **__: object) -> Stub:
        raise Reached

    monkeypatch.setattr(Stub, "spawn", no_fork)
    files = sorted(p for p in work.glob("*/*.img") if not p.name.startswith("pages-"))
    decoded = {f: decode(f) for f in files}
    rng = random.Random(SEED)
    per_file = []
    for f, (_, msgs) in decoded.items():
        found = [s for i, m in enumerate(msgs) for s in slots(f, i, m)]
        rng.shuffle(found)
        per_file.append(found)
    # round robin over the files, so that small ones are mutated as well as the core
    chosen = [s for row in itertools.zip_longest(*per_file) for s in row if s][:MUTANTS]
    assert len({s.file for s in chosen}) == len(files), "some image file was never mutated"
    # the restore must succeed on the untouched images (up to the fork)
    assert invoke(["restore", "-D", str(work / "2"), "--new-pid", "-d"]).reached_fork

    bad: list[str] = []
    refused = 0
    for slot in chosen:
        magic, msgs = decoded[slot.file]
        value = rng.choice(HOSTILE[slot.kind])
        mutant = [type(m)() for m in msgs]
        for m, orig in zip(mutant, msgs, strict=True):
            m.CopyFrom(orig)
        mutate(mutant[slot.entry], slot.path, value)
        tmp = slot.file.with_name(".mutant")
        tmp.write_bytes(encode_entries(magic, mutant))
        os.replace(tmp, slot.file)  # a new inode: no cached decode is reused
        what = f"{slot.describe()} = {value!r:.40}"
        free = (slot.owner, slot.path[-1][0]) in FREE
        kind = kind_of(slot.file.name).name
        try:
            try:
                readers(ImageDir(slot.file.parent), pid)[kind]()
                if not free:
                    bad.append(f"{what}: the {kind} reader accepted it")
            except ImageError:
                pass
            except Exception as exc:
                bad.append(f"{what}: the {kind} reader raised {type(exc).__name__}: {exc}")
            for args in (["show", str(slot.file.parent)],
                         ["restore", "-D", str(work / "2"), "--new-pid", "-d"]):
                got = invoke(args)
                if got.reached_fork:
                    if kind in RESTORE_READS and not free:
                        bad.append(f"{what}: restore went on to the fork")
                    continue
                if got.ok:
                    continue
                refused += 1
                lines = [line for line in got.stderr.splitlines() if line.strip()]
                if (len(lines) != 1 or not lines[0].startswith("Error: ")
                        or "internal error" in lines[0] or "Traceback" in got.stderr):
                    bad.append(f"{what}: `ckpt {args[0]}` said {got.stderr!r:.300}")
        finally:
            tmp.write_bytes(encode_entries(magic, msgs))
            os.replace(tmp, slot.file)
    assert not bad, f"{len(bad)} of {len(chosen)} mutants:\n" + "\n".join(bad[:30])
    assert refused > len(chosen) // 2, f"only {refused} refusals by show and restore"


@needs_root
@pytest.mark.parametrize("case", ["vma-kind", "long-parent", "nan-stats"])
def test_issue_mutants_one_error_line(chain: tuple[Path, int], harness: Harness,
                                      tmp_path: Path, case: str) -> None:
    """The three mutants of the issue, through the installed `ckpt`: one line naming
    the file and the field."""
    src, pid = chain
    work = tmp_path / "c"
    shutil.copytree(src, work)
    d = ImageDir(work / "2")
    if case == "vma-kind":
        entry = d.read_core(pid)
        entry.vmas[1].kind = 99  # type: ignore[assignment]
        d.write_core(pid, entry)
        file, field = "core", "vmas[1].kind"
    else:
        inv = d.read_inventory()
        if case == "long-parent":
            inv.parent = "p" * 4000
            field = "parent"
        else:
            inv.stats.frozen_ms = math.nan
            field = "stats.frozen_ms"
        d.write_inventory(inv)
        file = "inventory"
    for args in (("show", work / "2"),
                 ("restore", "-D", work / "2", "--new-pid", "-d", "--pidfile",
                  harness.new_pidfile())):
        message = assert_one_error_line(run_ckpt(*args))
        assert "internal error" not in message, message
        assert file in message and field in message, message
