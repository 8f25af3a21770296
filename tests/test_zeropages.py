"""Pages that map the kernel's shared zero page (read, never written) hold no data: no
image stores them, and a restored process has them back as zeros without owning them.

examples/targets/zeropages.py reads all of a 16 MiB region and writes every 8th page; a
later phase drops a written page and reads it again (the zero page, where a wrong
"unchanged since the parent" would bring back the old bytes)."""

from __future__ import annotations

import os
import signal
import subprocess
from array import array
from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_ckpt_ok,
    assert_running_untraced,
    needs_root,
    py_target,
    read_lines,
    run_ckpt,
    wait_for,
    wait_for_line,
)
from test_incremental import BACKENDS, require

from ckpt.collect.maps import read_smaps_vmflags
from ckpt.images import ImageDir
from ckpt.kernel import pagemap as pm
from ckpt.ranges import Range, intersect, normalize

pytestmark = needs_root

PAGE = 4096


def layout(out: Path) -> Range:
    line = wait_for_line(out, lambda s: s.startswith("layout "), 20, "layout line")
    fields = dict(f.split("=") for f in line.split()[1:])
    addr = int(fields["addr"], 16)
    return addr, addr + int(fields["size"])


def huge_region(out: Path) -> Range:
    """The 8 MiB MADV_HUGEPAGE region the target only reads (huge zero pages, with THP)."""
    line = next(s for s in read_lines(out) if s.startswith("layout "))
    addr = int(dict(f.split("=") for f in line.split()[1:])["huge"], 16)
    return addr, addr + (8 << 20)


def ticks(out: Path) -> list[dict[str, str]]:
    return [dict(f.split("=") for f in s.split()) for s in read_lines(out)
            if s.startswith("tick=")]


def wait_ticks(out: Path, n: int) -> list[dict[str, str]]:
    def enough() -> list[dict[str, str]] | None:
        got = ticks(out)
        return got if len(got) >= n else None

    return wait_for(enough, 20, f"{n} ticks")


def stored(images: Path, pid: int, region: Range) -> tuple[list[Range], list[Range]]:
    """(present, in_parent) pages of the image inside ``region``."""
    _, pmap = ImageDir.open(images).read_pagemap(pid)
    return intersect(pmap.present, [region]), intersect(pmap.in_parent, [region])


def written_pages(region: Range, phase: int) -> list[Range]:
    lo, hi = region
    pages = set(range(0, (hi - lo) // PAGE, 8))
    if phase:
        pages = (pages - {0}) | {1}
    return [(lo + p * PAGE, lo + (p + 1) * PAGE) for p in sorted(pages)]


def assert_goes_on(harness: Harness, out: Path, pid: int, before: list[dict[str, str]]) -> None:
    """The restored target prints the same region digest and RSS as before the dump,
    its ticks going on from where they stopped."""
    last = before[-1]
    after = wait_ticks(out, len(before) + 3)[len(before):]
    assert_running_untraced(pid)
    assert [int(t["tick"]) for t in after[:3]] == [int(last["tick"]) + i for i in (1, 2, 3)]
    for t in after:
        assert (t["phase"], t["sha"], t["rss"]) == (last["phase"], last["sha"], last["rss"])
    harness.kill(pid)


SMAPS_OPEN = "/smaps): a file of a process under /proc"


def ckpt_of(action: str, proc: subprocess.Popen[bytes], images: Path, *extra: str) -> None:
    """`ckpt ACTION -t` of the target (a dump: and reap it). The target reads its own
    /proc/self/smaps every tick (its RSS line): a pass that meets that fd open is rightly
    refused, and tried again."""
    for _ in range(10):
        res = run_ckpt(action, "-t", str(proc.pid), "-D", images, *extra,
                       reap=proc if action == "dump" else None)
        if res.returncode == 0 or SMAPS_OPEN not in res.stderr:
            break
    assert_ckpt_ok(res)
    if action == "dump":
        proc.wait(timeout=10)


def test_zero_page_flags_from_pagemap_entries() -> None:
    """Only present entries whose frame is the zero page's match; frames are visible to
    root only, and ckpt runs as root."""
    zero = pm.zero_pfn()
    assert zero
    entries = array("Q", [
        pm.PM_PRESENT | zero,               # the zero page
        pm.PM_PRESENT | (zero + 1),         # a real page next to it
        pm.PM_PRESENT | zero | (1 << 55),   # the zero page, soft-dirty bit set
        zero,                               # not present (garbage frame bits)
        pm.PM_SWAP | zero,                  # swapped: the frame bits are a swap entry
        0,
    ])
    flags = pm.zero_page_flags(entries).to_bytes(len(entries), "little")
    assert list(flags) == [1, 0, 1, 0, 0, 0]
    huge = pm.huge_zero_pfn()
    if huge:  # every frame of the huge zero page, and only those
        frames = array("Q", [pm.PM_PRESENT | (huge + k) for k in (0, 5, 511, 512)]
                       + [pm.PM_PRESENT | (huge - 1)])
        flags = pm.zero_page_flags(frames).to_bytes(len(frames), "little")
        assert list(flags) == [1, 1, 1, 0, 0]
    exists, present = pm.data_runs(entries, 0)
    assert exists == [(PAGE, PAGE), (4 * PAGE, PAGE)] and present == [(PAGE, PAGE)]


def test_full_dump_skips_zero_pages(harness: Harness, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    proc = harness.launch(py_target("zeropages.py"), out)
    region = layout(out)
    before = wait_ticks(out, 3)
    assert int(before[-1]["rss"]) == len(written_pages(region, 0)) * PAGE // 1024
    images = harness.images()
    ckpt_of("dump", proc, images)
    before = ticks(out)

    assert stored(images, proc.pid, region) == (written_pages(region, 0), [])
    assert stored(images, proc.pid, huge_region(out)) == ([], [])
    assert harness.restore_detached(images) == proc.pid
    # the target's MADV_NOHUGEPAGE comes back too: with THP, khugepaged would otherwise
    # collapse the sparse region into huge pages and its RSS would grow
    assert "nh" in read_smaps_vmflags(proc.pid)[region[0]]
    assert_goes_on(harness, out, proc.pid, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_then_read_is_a_hole(harness: Harness, tmp_path: Path, backend: str) -> None:
    """A page written before the predump, then dropped and read again (the zero page) is
    stored as a hole by the next dump: not "in parent", whatever the backend reports."""
    require(backend)
    out = tmp_path / "out.txt"
    proc = harness.launch(py_target("zeropages.py"), out)
    region = layout(out)
    wait_ticks(out, 2)
    ck = harness.images("ck")
    (ck / "1").mkdir()
    (ck / "2").mkdir()
    ckpt_of("predump", proc, ck / "1", "--track", backend)
    os.kill(proc.pid, signal.SIGUSR1)
    wait_for_line(out, lambda s: s == "phase=1 done", 20, "phase=1 done")
    n = len(ticks(out))
    wait_ticks(out, n + 2)
    ckpt_of("dump", proc, ck / "2", "--incremental", "--prev-images-dir", "../1",
            "--track", backend)
    before = ticks(out)
    assert before[-1]["phase"] == "1"

    present, in_parent = stored(ck / "2", proc.pid, region)
    covered = normalize(present + in_parent)
    assert not intersect([(region[0], region[0] + PAGE)], covered), "page 0 must be a hole"
    assert covered == written_pages(region, 1)
    assert harness.restore_detached(ck / "2") == proc.pid
    assert_goes_on(harness, out, proc.pid, before)
