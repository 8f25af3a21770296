"""ckpt.images.validate: the tables, without root (the fuzzer is test_image_fuzz.py)."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from typing import cast

import pytest
import zstandard

from ckpt.collect.sysvshm import contents
from ckpt.errors import ImageError, RestoreError
from ckpt.images import fields
from ckpt.images.fields import TRACKERS
from ckpt.images.imagedir import DIGEST_SIZE
from ckpt.images.pb import core_pb2 as core
from ckpt.images.pb import image_pb2 as img
from ckpt.images.validate import problems, validate
from ckpt.pagecopy.compare import DIGEST
from ckpt.restore.files import _open as open_by_path
from ckpt.restore.stub import Stub
from ckpt.track import BACKENDS


def process() -> core.ProcessEntry:
    entry = core.ProcessEntry(pid=42, ppid=1, comm="x", cwd="/tmp")
    entry.threads.add(tid=42).creds.uid = 1000
    entry.vmas.add(start=0x400000, end=0x401000, prot=5, path="/bin/x")
    entry.vmas.add(start=0xFFFFFFFFFF600000, end=0xFFFFFFFFFF601000,
                   kind=core.Vma.VSYSCALL)
    entry.files.add(id=1, type=core.OpenFile.REGULAR, path="/tmp/out")
    entry.fds.add(fd=1, file_id=1)
    return entry


def test_trackers_are_the_backends() -> None:
    assert set(TRACKERS) == set(BACKENDS)


def test_a_dump_like_entry_is_valid() -> None:
    assert list(problems(process())) == []


@pytest.mark.parametrize(("change", "field"), [
    (lambda e: setattr(e.vmas[0], "kind", 99), "vmas[0].kind"),
    (lambda e: setattr(e.vmas[0], "start", 0x400001), "vmas[0].start"),
    (lambda e: setattr(e.vmas[0], "end", 1 << 60), "vmas[0].start"),
    (lambda e: setattr(e.vmas[1], "start", 0x1000), "vmas[1].start"),
    (lambda e: setattr(e.fds[0], "file_id", 7), "fds[0].file_id"),
    (lambda e: setattr(e.fds[0], "fd", -1), "fds[0].fd"),
    (lambda e: setattr(e.files[0], "path", "out"), "files[0].path"),
    (lambda e: setattr(e, "cwd", "/a\0b"), "cwd"),
    (lambda e: e.sigactions.add(signo=65), "sigactions[0].signo"),
    (lambda e: e.sigactions.add(signo=9), "sigactions[0].signo"),
    (lambda e: e.rlimits.add(resource=16), "rlimits[0].resource"),
    (lambda e: e.rlimits.add(resource=7, cur=10, max=5), "rlimits[0].cur"),
    (lambda e: e.threads.add(tid=42), "threads.tid[1]"),
    (lambda e: setattr(e.threads[0], "tid", 43), "threads[0].tid"),
    (lambda e: e.shared_pending.append(b"\0" * 127), "shared_pending[0]"),
])
def test_out_of_range_fields_are_named(change: object, field: str) -> None:
    entry = process()
    change(entry)  # type: ignore[operator]
    with pytest.raises(ImageError, match=rf"core-42\.img: corrupted \({re.escape(field)} = "):
        validate("core-42.img", entry)


def test_inventory_and_pagemap() -> None:
    inv = img.Inventory(root_pid=42, pids=[42], kind="dump", tracker="none", parent="../1")
    validate("inventory.img", inv)
    inv.stats.frozen_ms = math.nan
    with pytest.raises(ImageError, match=r"stats\.frozen_ms = nan"):
        validate("inventory.img", inv)
    inv.stats.frozen_ms = 1.0
    inv.parent = "p" * 300
    with pytest.raises(ImageError, match="parent = 'ppp"):
        validate("inventory.img", inv)
    runs = img.PagemapRuns(vaddr=[0x1000], nr_pages=[1 << 50], flags=[img.PRESENT])
    with pytest.raises(ImageError, match=r"entry 1 vaddr\[0\]"):
        validate("pagemap-42.img", img.PagemapHead(pid=42), runs)


def test_digest_size_is_the_compare_backends() -> None:
    assert DIGEST_SIZE == DIGEST


def with_file(**fields: object) -> tuple[core.ProcessEntry, core.OpenFile]:
    entry = process()
    f = entry.files.add(id=2, **fields)
    entry.fds.add(fd=3, file_id=2)
    return entry, f


def memfd(f: core.OpenFile) -> None:
    f.type, f.size, f.path = core.OpenFile.MEMFD, 100, "/memfd:x (deleted)"
    f.memfd.name = "x"
    f.memfd.data.add(offset=0, data=b"abc")


def inet(f: core.OpenFile) -> None:
    f.type = core.OpenFile.INET_SOCKET
    s = f.inet_socket
    s.family, s.type, s.protocol, s.state, s.backlog = 2, 1, 6, 10, 128
    s.local.addr, s.local.port = b"\x7f\0\0\1", 8080


def ghost(f: core.OpenFile) -> None:
    f.type, f.size, f.path = core.OpenFile.GHOST, 10, "/tmp/gone (deleted)"


@pytest.mark.parametrize(("make", "change", "field"), [
    (memfd, lambda f: setattr(f.memfd, "name", "n" * 250), "memfd.name"),
    (memfd, lambda f: setattr(f.memfd, "seals", 0x40), "memfd.seals"),
    (memfd, lambda f: setattr(f.memfd, "uid", 2**32 - 1), "memfd.uid"),
    (memfd, lambda f: setattr(f.memfd.data[0], "offset", 2**63), "memfd.data[0].offset"),
    (memfd, lambda f: setattr(f.memfd.data[0], "offset", 98), "memfd.data[0].offset"),
    (ghost, lambda f: setattr(f, "path", "gone (deleted)"), "path"),
    (ghost, lambda f: setattr(f, "path", "/tmp/../etc/gone (deleted)"), "path"),
    (ghost, lambda f: setattr(f, "path", "/tmp/./gone (deleted)"), "path"),
    (None, lambda f: f.inotify.watches.add(wd=1, path="/tmp", mask=0x20000000),
     "inotify.watches[0].mask"),
    (None, lambda f: setattr(f.timerfd, "ticks", 2**64 - 1), "timerfd.ticks"),
    (None, lambda f: setattr(f.timerfd, "clock_ns", -1), "timerfd.clock_ns"),
    (None, lambda f: f.timerfd.MergeFrom(core.TimerFd(clock_ns=2**62, value_ns=2**63 - 2**61)),
     "timerfd.value_ns"),
    (inet, lambda f: setattr(f.inet_socket, "backlog", 2**32 - 1), "inet_socket.backlog"),
    (inet, lambda f: setattr(f.inet_socket.local, "addr", b"\1" * 3),
     "inet_socket.local.addr"),
    (inet, lambda f: f.inet_socket.options.add(name="SO_MARK", value=2**40),
     "inet_socket.options[0].value"),
    (None, lambda f: setattr(f.unix_socket, "type", 9), "unix_socket.type"),
    (None, lambda f: f.epoll.watches.add(tfd=5), "epoll.watches[0].tfd"),
])
def test_fd_kind_fields_are_named(make: object, change: object, field: str) -> None:
    entry, f = with_file(type=core.OpenFile.EVENTFD)
    if make is not None:
        make(f)  # type: ignore[operator]
        assert list(problems(entry)) == []
    change(f)  # type: ignore[operator]
    with pytest.raises(ImageError, match=rf"corrupted \(files\[1\]\.{re.escape(field)} = "):
        validate("core-42.img", entry)


@pytest.mark.parametrize(("change", "field"), [
    (lambda e: e.cgroups.add(path="/a/../../etc"), "cgroups[0].path"),
    (lambda e: e.cgroups.add(path="/a", hierarchy=2**32 - 1), "cgroups[0].hierarchy"),
    (lambda e: setattr(e.threads[0].sched, "priority", 5), "threads[0].sched.priority"),
    (lambda e: e.threads[0].seccomp_filters.add(program=b"\0" * 8, flags=8),
     "threads[0].seccomp_filters[0].flags"),
    (lambda e: e.guard_regions.add(start=0x401000, end=0x400000), "guard_regions[0].start"),
])
def test_process_fields_are_named(change: object, field: str) -> None:
    entry = process()
    change(entry)  # type: ignore[operator]
    with pytest.raises(ImageError, match=rf"corrupted \({re.escape(field)} = "):
        validate("core-42.img", entry)


def zombie() -> core.ProcessEntry:
    """A zombie member as the dump writes it: one ThreadCore with its ids."""
    entry = core.ProcessEntry(pid=43, ppid=42, comm="z", zombie=True, exit_status=3 << 8)
    entry.threads.add(tid=43, creds=core.Creds(uid=65534, euid=65534, groups=[5]))
    return entry


@pytest.mark.parametrize(("change", "field"), [
    (lambda e: e.ClearField("threads"), "threads"),
    (lambda e: e.threads.add(tid=44, creds=core.Creds()), "threads"),
    (lambda e: setattr(e.threads[0], "tid", 44), "threads[0].tid"),
    (lambda e: e.threads[0].ClearField("creds"), "threads[0].creds"),
    (lambda e: setattr(e.threads[0], "sigmask", 1), "threads[0].sigmask"),
    (lambda e: e.threads[0].regs.SetInParent(), "threads[0].regs"),
    (lambda e: e.vmas.add(start=0x400000, end=0x401000), "vmas"),
    (lambda e: e.fds.add(fd=1, file_id=1), "fds"),
    (lambda e: e.cgroups.add(path="/a"), "cgroups"),
])
def test_a_zombie_has_one_thread_with_only_its_credentials(change: object, field: str,
                                                           ) -> None:
    entry = zombie()
    assert list(problems(entry)) == []
    change(entry)  # type: ignore[operator]
    assert field in [p[0] for p in problems(entry)]


def test_a_realtime_policy_needs_a_priority() -> None:
    entry = process()
    entry.threads[0].sched.policy = 1  # SCHED_FIFO
    entry.threads[0].sched.priority = 10
    assert list(problems(entry)) == []
    entry.threads[0].sched.priority = 0
    assert [p[0] for p in problems(entry)] == ["threads[0].sched.priority"]


def test_corrupt_sysv_shm_contents_are_one_restore_error() -> None:
    seg = core.SysvShm(shmid=7, size=4096, data=b"\1" * 3)
    with pytest.raises(RestoreError, match="System V shared memory 7: its contents in the "
                                           "image are corrupted"):
        contents(seg)
    seg.data = zstandard.ZstdCompressor().compress(b"x" * 4096)
    assert contents(seg) == b"x" * 4096


def test_an_open_file_of_a_kind_not_restored_is_never_opened_by_path() -> None:
    f = core.OpenFile(id=1, type=core.OpenFile.UNIX_SOCKET, path="/etc/shadow")
    with pytest.raises(RestoreError, match="of type UNIX_SOCKET, which this ckpt does not"):
        open_by_path(cast(Stub, None), f)


def test_no_message_has_two_rows_in_fields() -> None:
    """A message listed twice in the FIELDS literal: the later row silently wins (a merge
    once left InetSocket, InetAddress and InetOption twice), so the source is read."""
    tree = ast.parse(Path(fields.__file__).read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.AnnAssign)
                 and isinstance(n.target, ast.Name) and n.target.id == "FIELDS")
    assert isinstance(table, ast.Dict)
    keys = [ast.unparse(k) for k in table.keys if k is not None]
    assert sorted({k for k in keys if keys.count(k) > 1}) == []
    assert len(keys) == len(fields.FIELDS)
