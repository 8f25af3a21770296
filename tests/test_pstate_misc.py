"""Per-process settings and VMA flags: oom_score_adj, loginuid, membarrier registrations,
guard regions and every VmFlag smaps shows, restored exactly or refused before the freeze
(ckpt.collect.pstate, ckpt.collect.vmflags, ckpt.restore.pstate, ckpt.restore.mm)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_one_error_line,
    assert_running_untraced,
    needs_root,
    py_target,
    read_lines,
    run_ckpt,
    wait_for_line,
)
from test_migrate import start_server

from ckpt.collect.maps import read_smaps
from ckpt.collect.pstate import read_loginuid, read_oom_score_adj, split_at_vmas
from ckpt.collect.restorable import Target, refusals
from ckpt.collect.vmas import VmaInfo, VmaKind, collect_vmas
from ckpt.collect.vmflags import BY_MNEMONIC, MADVICE, VMFLAGS, How, refused_flags
from ckpt.errors import ImageError, NoSuchProcess
from ckpt.images import ImageDir
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.validate import validate
from ckpt.ranges import intersect
from ckpt.restore.mm import MAP_TIME_FLAGS
from ckpt.restore.pstate import membarrier_commands

PAGE = 4096
PM_GUARD = 1 << 58
#: show_smap_vma_flags of Linux 6.18 (fs/proc/task_mmu.c), x86-64 and arm64 together,
#: plus 6.18's stable "gu"
KERNEL_618 = ["rd", "wr", "ex", "sh", "mr", "mw", "me", "ms", "gd", "pf", "lo", "io", "sr",
              "rr", "dc", "de", "lf", "ac", "nr", "ht", "sf", "ar", "wf", "dd", "bt", "sd",
              "mm", "hg", "nh", "mg", "um", "uw", "mt", "ui", "ss", "dp", "sl", "gu"]


# --------------------------------------------------------------------------- pure


def vma(flags: str, kind: VmaKind = VmaKind.ANON_PRIVATE, start: int = 0x7F0000000000,
        ) -> VmaInfo:
    return VmaInfo(start=start, end=start + 4 * PAGE, prot=3, shared=False, kind=kind,
                   pgoff=0, path="", dev=0, inode=0, vmflags=tuple(flags.split()))


def test_the_table_has_every_flag_of_the_kernel_once() -> None:
    assert [f.mnemonic for f in VMFLAGS] == KERNEL_618
    assert all(f.name.startswith("VM_") and f.means for f in VMFLAGS)


def test_every_restored_flag_has_a_restorer() -> None:
    """MADVISE flags have their advice; the map-time ones are what a warm restore keeps."""
    assert set(MADVICE) == {f.mnemonic for f in VMFLAGS if f.how == How.MADVISE}
    assert {"nr", "dp", "gu", *MADVICE} == set(MAP_TIME_FLAGS)


def test_refused_flags() -> None:
    fine = ["rd", "wr", "mr", "mw", "me", "ac", "hg", "dd", "lo", "lf", "dp", "sl", "gu"]
    assert refused_flags(fine, False, False) == []
    assert refused_flags(["rd", "um"], False, False) == ["um (registered with a userfaultfd)"]
    assert refused_flags(["ht", "zz"], False, False) == [
        "ht (hugetlbfs or MAP_HUGETLB memory)", "zz (unknown to ckpt)"]
    # uffd-wp: ckpt's own tracker's registration, else the process's
    assert refused_flags(["uw"], False, True) == []
    assert refused_flags(["uw"], False, False)[0].startswith("uw ")
    # the kernel's own mappings: pf io de are theirs
    assert refused_flags(["rd", "pf", "io", "de", "dd"], True, False) == []
    assert [f.split()[0] for f in refused_flags(["pf", "io", "de"], False, False)] == [
        "pf", "io", "de"]


def test_a_vma_with_a_refused_flag_is_refused_by_address() -> None:
    base = Target(pid=7, children=(), cwd="/", root="/", own_root="/", mnt_ns="m",
                  own_mnt_ns="m", vmas=(vma("rd wr mr mw me ac"), vma("rd pf io de dd",
                                                                      VmaKind.VVAR, 1 << 40)),
                  fds=(), shell_job=False)
    assert refusals(base) == []
    bad = Target(**{**base.__dict__, "vmas": (vma("rd wr mr mw me um ac", start=0x10000),)})
    assert refusals(bad) == [
        "process 7 maps anonymous memory at 0x10000 with VmFlags um (registered with a "
        "userfaultfd), which a restore cannot set again: not supported yet"]
    tracked = vma("rd wr mr mw me uw ac")
    assert refusals(Target(**{**base.__dict__, "vmas": (tracked,)}))
    assert not refusals(Target(**{**base.__dict__, "vmas": (tracked,), "tracker": True}))


SMAPS_PKEY = """\
7f0000000000-7f0000004000 rw-p 00000000 00:00 0
Size:                 16 kB
ProtectionKey:         0
VmFlags: rd wr mr mw me ac
7f0000004000-7f0000008000 rw-p 00000000 00:00 0
Size:                 16 kB
ProtectionKey:         3
VmFlags: rd wr mr mw me ac
"""


def test_a_protection_key_is_read_and_refused(tmp_path: Path) -> None:
    """On a CPU with PKU, smaps shows each VMA's key: a VMA with a key other than 0 is
    refused (a restore would map it with key 0)."""
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / "smaps").write_text(SMAPS_PKEY)
    (tmp_path / "9" / "maps").write_text("".join(
        line + "\n" for line in SMAPS_PKEY.splitlines() if line[0] in "0123456789abcdef"))
    vmas = collect_vmas(9, root=str(tmp_path))
    assert [v.pkey for v in vmas] == [0, 3]
    assert [v.pkey for v in collect_vmas(9, root=str(tmp_path), known=vmas)] == [0, 3]
    target = Target(pid=9, children=(), cwd="/", root="/", own_root="/", mnt_ns="m",
                    own_mnt_ns="m", vmas=tuple(vmas), fds=(), shell_job=False)
    assert refusals(target) == [
        "process 9 maps anonymous memory at 0x7f0000004000 with memory protection key 3 "
        "(pkey_mprotect): not supported yet"]


def test_membarrier_commands() -> None:
    assert membarrier_commands(0) == []
    assert membarrier_commands(0x154) == [4, 16, 64, 256]
    assert membarrier_commands(16) == [16]
    with pytest.raises(ValueError, match="0x2"):
        membarrier_commands(0x12)


def test_guard_regions_are_cut_at_vma_boundaries() -> None:
    a, b = vma("rd", start=0x10000), vma("rd", start=0x14000)
    assert split_at_vmas([(0x12000, 0x16000), (0x17000, 0x18000)], [a, b]) == [
        (0x12000, 0x14000), (0x14000, 0x16000), (0x17000, 0x18000)]


def test_readers_on_a_captured_tree(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "oom_score_adj").write_text("-17\n")
    (tmp_path / "42" / "loginuid").write_text("4294967295")
    assert read_oom_score_adj(42, root=str(tmp_path)) == -17
    assert read_loginuid(42, root=str(tmp_path)) == 0xFFFFFFFF
    (tmp_path / "42" / "loginuid").unlink()  # a kernel without audit
    assert read_loginuid(42, root=str(tmp_path)) is None
    with pytest.raises(NoSuchProcess):
        read_loginuid(43, root=str(tmp_path))


def entry_with(**fields: object) -> pb.ProcessEntry:
    e = pb.ProcessEntry(pid=5, threads=[pb.ThreadCore(tid=5, creds=pb.Creds())],
                        vmas=[pb.Vma(start=0x10000, end=0x20000, prot=3)])
    for name, value in fields.items():
        if name == "guard_regions":
            for s, end in value:  # type: ignore[attr-defined]
                e.guard_regions.add(start=s, end=end)
        else:
            setattr(e, name, value)
    return e


@pytest.mark.parametrize(("fields", "field"), [
    ({"oom_score_adj": 1001}, "oom_score_adj"),
    ({"membarrier_registrations": 0x2}, "membarrier_registrations"),
    ({"guard_regions": [(0x20000, 0x21000)]}, "guard_regions[0].start"),
    ({"guard_regions": [(0x12000, 0x13000), (0x11000, 0x12000)]}, "guard_regions[1].start"),
    ({"guard_regions": [(0x12800, 0x13000)]}, "guard_regions[0].start"),
])
def test_bad_settings_in_an_image_are_refused(fields: dict[str, object], field: str) -> None:
    validate("core-5.img", entry_with(oom_score_adj=0, loginuid=7, guard_regions=[
        (0x11000, 0x12000)], membarrier_registrations=0x154))
    with pytest.raises(ImageError, match=re.escape(f"({field} =")):
        validate("core-5.img", entry_with(**fields))


# --------------------------------------------------------------------------- live


def launch(harness: Harness, tmp_path: Path, *args: str,
           ) -> tuple[subprocess.Popen[bytes], Path, dict[str, int]]:
    out = tmp_path / "out.txt"
    proc = harness.launch([*py_target("pstate_misc.py"), *args], out)
    wait_for_line(out, lambda s: s == "ready", 20, "ready")
    regions = {s.split()[2][5:]: int(s.split()[1][5:], 16) for s in read_lines(out)
               if s.startswith("region ")}
    return proc, out, regions


def membarrier(pid: int, out: Path) -> int:
    """What the process itself says its registrations are (it answers SIGUSR1)."""
    seen = sum(s.startswith("membarrier=") for s in read_lines(out))
    os.kill(pid, signal.SIGUSR1)
    wait_for_line(out, lambda s: sum(x.startswith("membarrier=") for x in read_lines(out))
                  > seen, 10, "a membarrier line")
    return int([s for s in read_lines(out) if s.startswith("membarrier=")][-1][11:])


def guard_pages(pid: int, start: int, pages: int) -> list[int]:
    """Indexes of the pages of [start, start + pages) that are guard regions."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        raw = f.read(8 * pages)
    return [i for i in range(pages)
            if int.from_bytes(raw[8 * i:8 * i + 8], "little") & PM_GUARD]


def flag_map(pid: int, drop: str = "") -> dict[int, tuple[int, tuple[str, ...]]]:
    """start -> (end, VmFlags but ``drop``) of the address space, neighbours with equal
    flags as one (two such VMAs may be one after a restore: the kernel merges them)."""
    out: dict[int, tuple[int, tuple[str, ...]]] = {}
    last = -1
    for e in read_smaps(pid):
        flags = tuple(f for f in e.vmflags if f != drop)
        if last in out and out[last] == (e.start, flags):
            out[last] = (e.end, flags)
        else:
            out[e.start], last = (e.end, flags), e.start
    return out


def state(pid: int, out: Path, regions: dict[str, int], drop: str = "",
          ) -> dict[str, object]:
    """Everything the test compares before and after: settings, every VMA's flags, the
    guard pages and the bytes of the pages around them."""
    got: dict[str, object] = {
        "oom_score_adj": read_oom_score_adj(pid), "loginuid": read_loginuid(pid),
        "membarrier": membarrier(pid, out), "vmflags": flag_map(pid, drop)}
    if "guarded" in regions:
        at = regions["guarded"]
        got["guards"] = guard_pages(pid, at, 16)
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            got["bytes"] = [mem.seek(at + i * PAGE) and mem.read(1)[0]
                            for i in range(16) if i not in got["guards"]]  # type: ignore
    if "sealedro" in regions:
        got["sealedro guards"] = guard_pages(pid, regions["sealedro"], 4)
    for name in ("droppable", "sealed", "shared", "maybeguard"):
        if name in regions:
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                mem.seek(regions[name])
                got[name] = mem.read(4 * PAGE)
    return got


def check_target(before: dict[str, object], regions: dict[str, int]) -> None:
    """The target did set up what the test is about (else the test could not fail)."""
    assert before["oom_score_adj"] == 500 and before["loginuid"] == 4242
    assert before["membarrier"] != 0
    assert before["guards"] == [4, 5, 9]
    assert before["sealedro guards"] == [2]
    assert before["bytes"] == [i + 1 for i in range(16) if i not in (4, 5, 9)]
    vmas = before["vmflags"]
    assert isinstance(vmas, dict)
    flags = {start: fl for start, (_, fl) in vmas.items()}
    shown = {f for fl in flags.values() for f in fl}
    assert {"gu", "dp", "sl", "lo", "lf", "sh", "ms", "gd"} <= shown, shown
    assert set(regions) >= {"guarded", "droppable", "sealed", "sealedro", "maybeguard",
                            "locked", "shared", "sharedro"}
    assert "ms" in flags[regions["sharedro"]] and not {"sh", "mw"} & set(
        flags[regions["sharedro"]])


def assert_no_guard_stored(images: Path, pid: int, at: int, guards: list[int]) -> None:
    """The image neither stores a guard page nor takes it from its parent."""
    _, pagemap = ImageDir.open(images).read_pagemap(pid)
    pages = [(at + i * PAGE, at + (i + 1) * PAGE) for i in guards]
    assert intersect(pagemap.covered, pages) == []
    assert intersect(pagemap.covered, [(at, at + PAGE)]) == [(at, at + PAGE)]


def assert_same(after: dict[str, object], before: dict[str, object]) -> None:
    """Equal; VMAs whose flags differ are listed by address."""
    a, b = after["vmflags"], before["vmflags"]
    assert isinstance(a, dict) and isinstance(b, dict)
    assert {f"{k:#x}": (a.get(k), b.get(k)) for k in a.keys() | b.keys()
            if a.get(k) != b.get(k)} == {}
    assert after == before


@needs_root
def test_settings_and_vmflags_survive_dump_and_restore(harness: Harness, tmp_path: Path,
                                                       ) -> None:
    """oom_score_adj, loginuid, membarrier registrations, guard regions (never read as
    pages; the bytes around them intact) and the VmFlags of every VMA (gu, dp, sl, lo,
    lf and all the rest) are the same in the restored process."""
    proc, out, regions = launch(harness, tmp_path)
    before = state(proc.pid, out, regions)
    check_target(before, regions)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    assert_no_guard_stored(images, proc.pid, regions["guarded"], [4, 5, 9])
    pid = harness.restore_detached(images, "--new-pid")  # no race for the dumped pid
    assert_same(state(pid, out, regions), before)
    assert_running_untraced(pid)


@needs_root
def test_settings_survive_predump_and_incremental_dump(harness: Harness, tmp_path: Path,
                                                       ) -> None:
    """The same through predump (uffd-wp tracking) and dump --incremental, with a guard
    installed between the passes on a page the predump stored: the tracker sees it
    written, and it must be neither copied (it cannot be read) nor taken from the
    parent."""
    proc, out, regions = launch(harness, tmp_path)
    before = state(proc.pid, out, regions)
    check_target(before, regions)
    ck = tmp_path / "ck"
    res = run_ckpt("predump", "-t", str(proc.pid), "-D", ck / "1", "--track=uffd-wp")
    assert res.returncode == 0, res.describe()
    os.kill(proc.pid, signal.SIGUSR2)  # a guard on a page the predump stored
    wait_for_line(out, lambda s: s == "guarded 12", 10, "guarded 12")
    before = state(proc.pid, out, regions, drop="uw")  # the predump's tracker's
    assert before["guards"] == [4, 5, 9, 12]
    res = run_ckpt("dump", "-t", str(proc.pid), "-D", ck / "2", "--incremental",
                   "--prev-images-dir", "../1", reap=proc)
    assert res.returncode == 0, res.describe()
    proc.wait(timeout=10)
    assert_no_guard_stored(ck / "2", proc.pid, regions["guarded"], [4, 5, 9, 12])
    pid = harness.restore_detached(ck / "2", "--new-pid")
    assert_same(state(pid, out, regions), before)
    assert_running_untraced(pid)


@needs_root
def test_settings_survive_migration(harness: Harness, tmp_path: Path) -> None:
    """ckpt migrate (rounds under uffd-wp, a warm restore at the destination) brings the
    same settings, guard regions and VmFlags to the migrated process."""
    proc, out, regions = launch(harness, tmp_path)
    before = state(proc.pid, out, regions)
    check_target(before, regions)
    token = tmp_path / "token"
    token.write_text("migrate-me\n")
    port = start_server(tmp_path / "dest")
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", f"127.0.0.1:{port}",
                   "--auth-token-file", token, reap=proc)
    assert res.returncode == 0, res.describe()
    found = re.search(r"as pid (\d+)", res.stdout)
    assert found, res.stdout
    pid = int(found[1])
    harness.track(pid)
    proc.wait(timeout=10)
    assert_same(state(pid, out, regions), before)
    assert_running_untraced(pid)


@needs_root
def test_every_vma_of_the_madvise_target_keeps_its_flags(harness: Harness, tmp_path: Path,
                                                         ) -> None:
    """examples/targets/madvised.py: one region per madvise advice and mlock mode, a
    MAP_NORESERVE one, a PROT_NONE reservation: the VmFlags of the whole address space
    are the same after a restore."""
    out = tmp_path / "out.txt"
    proc = harness.launch(py_target("madvised.py"), out)
    wait_for_line(out, lambda s: s == "ready", 20, "ready")
    before = flag_map(proc.pid)
    shown = {f for _, fl in before.values() for f in fl}
    assert {"hg", "nh", "dd", "dc", "wf", "sr", "rr", "lo", "lf", "nr"} <= shown, shown
    images = harness.images()
    harness.dump_and_reap(proc, images)
    pid = harness.restore_detached(images, "--new-pid")
    assert_same({"vmflags": flag_map(pid)}, {"vmflags": before})
    assert_running_untraced(pid)


@needs_root
@pytest.mark.parametrize("loginuid", [4242, -1])
def test_loginuid_when_the_restoring_ckpt_has_another(harness: Harness, tmp_path: Path,
                                                      loginuid: int) -> None:
    """The stub inherits the restoring ckpt's loginuid (here 7, set before ckpt runs):
    the dumped one replaces it, an unset one included (CAP_AUDIT_CONTROL). The sessionid
    is the kernel's to hand out: not restored."""
    proc, _, _ = launch(harness, tmp_path, "--loginuid", str(loginuid))
    assert read_loginuid(proc.pid) == loginuid & 0xFFFFFFFF
    images = harness.images()
    harness.dump_and_reap(proc, images)
    pidfile = harness.new_pidfile()
    res = run_ckpt("restore", "-D", images, "--restore-detached", "--new-pid", "--pidfile",
                   pidfile, prefix=("sh", "-c", 'echo 7 > /proc/self/loginuid && exec "$@"',
                                    "sh"))
    assert res.returncode == 0, res.describe()
    pid = int(pidfile.read_text())
    assert read_loginuid(pid) == loginuid & 0xFFFFFFFF
    assert_running_untraced(pid)


@needs_root
def test_a_userfaultfd_registration_is_refused_before_the_freeze(harness: Harness,
                                                                 tmp_path: Path) -> None:
    """A VMA registered with a userfaultfd ("um") cannot be registered again: dump and
    predump name the flag and the address, the target runs on untouched."""
    proc, out, regions = launch(harness, tmp_path, "--uffd")
    for action in ("dump", "predump"):
        images = harness.images(action)
        line = assert_one_error_line(run_ckpt(action, "-t", str(proc.pid), "-D", images))
        assert f"at {regions['uffd']:#x} with VmFlags um (registered with a userfaultfd)" \
            in line
        assert not (images / "inventory.img").exists()
        assert_running_untraced(proc.pid)
    n = len(read_lines(out))
    wait_for_line(out, lambda s: len(read_lines(out)) > n + 1, 10, "more alive lines")
    assert BY_MNEMONIC["um"].how == How.REFUSED
