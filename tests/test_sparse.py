"""Huge sparse VMAs (a 1 TiB MAP_NORESERVE reservation with two written pages, as
runtimes and ASan make them): tracking, dump and restore cost what the pages cost, not
what the address space would, and the process is not made to pay for it either."""

from __future__ import annotations

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
    wait_for_line,
)
from test_incremental import require

from ckpt.collect.maps import read_smaps_vmflags
from ckpt.images import ImageDir

pytestmark = needs_root

TIB = 1 << 40
PAGE = 4096


def vm_pte_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmPTE:"))


def test_uffd_wp_leaves_a_huge_reservation_untracked(harness: Harness, tmp_path: Path) -> None:
    """Write-protecting the whole reservation would put a marker in every empty PTE: 2 GiB
    of page tables in the target. The predump leaves it unregistered instead (reported as
    copied whole, each pass: its two pages), the target's page tables stay small, and the
    chain restores both pages and the flags."""
    require("uffd-wp")
    out = tmp_path / "out.txt"
    proc = harness.launch(py_target("madvised.py"), out)
    wait_for_line(out, lambda s: s == "ready", 20, "ready")
    named = {s.split()[2].split("=")[1]: int(s.split()[1].split("=")[1], 16)
             for s in read_lines(out) if s.startswith("region ")}
    huge = named.get("NORESERVE")
    if huge is None:
        pytest.skip("no 1 TiB MAP_NORESERVE mapping here (strict overcommit ignores the flag)")
    flags = read_smaps_vmflags(proc.pid)[huge]
    ck = harness.images("ck")
    res = run_ckpt("predump", "-t", str(proc.pid), "-D", ck / "1", "--track", "uffd-wp")
    assert_ckpt_ok(res)
    assert "would add 2.0 GiB of page tables" in res.stderr  # 2 GiB less 2 used extents
    assert vm_pte_kib(proc.pid) < 16 << 10
    harness.dump_and_reap(proc, ck / "2", "--incremental", "--prev-images-dir", "../1",
                          "--track", "uffd-wp")

    stats = ImageDir.open(ck / "2").read_inventory().stats
    assert any(w.start <= huge < w.end and "page tables" in w.reason for w in stats.whole_vmas)
    # the runtime-like heap: its reservation is left untracked, its committed part is not
    first = ImageDir.open(ck / "1").read_inventory().stats.whole_vmas
    assert any(w.start == named["RESERVED"] and "page tables" in w.reason for w in first)
    assert not any(w.start <= named["COMMITTED"] < w.end for w in list(first) + list(
        stats.whole_vmas))
    assert harness.restore_detached(ck / "2") == proc.pid
    assert read_smaps_vmflags(proc.pid)[huge] == flags
    with open(f"/proc/{proc.pid}/mem", "rb", buffering=0) as mem:
        got = [mem.seek(a) and mem.read(4) for a in (huge, huge + TIB - PAGE, huge + PAGE)]
    assert got == [b"\x09" * 4, b"\x0a" * 4, bytes(4)]
    assert_running_untraced(proc.pid)
    harness.kill(proc.pid)
