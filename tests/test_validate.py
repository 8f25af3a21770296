"""ckpt.images.validate: the tables, without root (the fuzzer is test_image_fuzz.py)."""

from __future__ import annotations

import math
import re

import pytest

from ckpt.errors import ImageError
from ckpt.images.imagedir import DIGEST_SIZE
from ckpt.images.pb import core_pb2 as core
from ckpt.images.pb import image_pb2 as img
from ckpt.images.validate import TRACKERS, problems, validate
from ckpt.pagecopy.compare import DIGEST
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
