"""Incremental checkpoints end to end: predump, predump --prev-images-dir, dump
--incremental, restore of the chain, with examples/targets/scenarios.c.

The scenarios target changes its memory in known ways at each phase (SIGUSR1) and checks
every byte of every region against its bookkeeping on SIGUSR2 (`verify ok` / `verify FAIL
<region> <page> want=.. got=..`), so a restore that resurrects stale pages, loses a
remapped VMA, the brk, a COW'd file page or a thread's writes is caught by the process
itself. Each tracking backend available here runs the same chain; soft-dirty ones carry
the ``soft_dirty`` marker (skipped on kernels without it, selected with -m soft_dirty in a
VM run).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    CKPT_TIMEOUT,
    PYTHON,
    Bins,
    CkptResult,
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    fd_links,
    is_alive,
    needs_root,
    our_children,
    pids_running,
    py_target,
    read_lines,
    run_ckpt,
    wait_for,
    wait_for_line,
)

from ckpt.kernel.probe import Capabilities, probe

pytestmark = needs_root

PAGE = 4096


@functools.cache
def _capabilities() -> Capabilities:
    return probe()


def backend_missing(backend: str) -> str | None:
    """Why this machine cannot use a tracking backend, or None if it can."""
    caps = _capabilities()
    if backend == "uffd-wp":
        for feature in ("uffd-wp-async", "pagemap-scan"):
            if not caps.ok(feature):
                return f"{feature}: {caps.get(feature).detail}"
    elif backend == "soft-dirty" and not caps.ok("soft-dirty"):
        return caps.get("soft-dirty").detail
    return None


def require(backend: str) -> None:
    why = backend_missing(backend)
    if why is not None:
        pytest.skip(f"{backend} unavailable here: {why}")


BACKENDS = [
    pytest.param("uffd-wp", id="uffd-wp"),
    pytest.param("soft-dirty", id="soft-dirty", marks=pytest.mark.soft_dirty),
    pytest.param("compare", id="compare"),
]
TRACKING = ("uffd-wp", "soft-dirty")  # backends that report whole-VMA copies


# --------------------------------------------------------------------------- the target


class Scenarios:
    """One running scenarios process (original or restored: same pid, same out file)."""

    def __init__(self, harness: Harness, argv: list[str | Path], out: Path) -> None:
        self.out = out
        self.proc = harness.launch(argv, out)
        self.pid = self.proc.pid
        self.phase = 0
        line = wait_for_line(out, lambda s: s == "ready phase=0" or s.startswith("fatal"), 20,
                             "`ready phase=0`")
        assert line == "ready phase=0", self.tail()
        self.layout = self._fields(next(s for s in read_lines(out) if s.startswith("layout ")))

    @staticmethod
    def _fields(line: str) -> dict[str, str]:
        return dict(f.split("=", 1) for f in line.split()[1:])

    def tail(self, n: int = 8) -> str:
        return "\n".join(read_lines(self.out)[-n:])

    def addr(self, name: str) -> int:
        return int(self.layout[name], 16)

    def advance(self) -> dict[str, str]:
        """SIGUSR1; wait for `phase=<k> done`; return that phase's `info` fields."""
        os.kill(self.pid, signal.SIGUSR1)
        self.phase += 1
        want = f"phase={self.phase} done"
        line = wait_for_line(self.out, lambda s: s in (want, "phase limit") or
                             s.startswith("fatal"), 20, want)
        assert line == want, self.tail()
        info = f"info phase={self.phase} "
        return next((self._fields(s) for s in read_lines(self.out) if s.startswith(info)), {})

    def verify(self) -> str:
        """SIGUSR2; return the process's `verify ...` line."""
        before = sum(s.startswith("verify ") for s in read_lines(self.out))
        os.kill(self.pid, signal.SIGUSR2)

        def new_line() -> str | None:
            found = [s for s in read_lines(self.out) if s.startswith("verify ")]
            return found[before] if len(found) > before else None

        return wait_for(new_line, 30, f"a verify line from {self.pid}\n{self.tail()}")

    def assert_verifies(self) -> None:
        line = self.verify()
        assert line.startswith(f"verify ok phase={self.phase} "), line


def scenarios(harness: Harness, bins: Bins, tmp_path: Path, name: str = "scen") -> Scenarios:
    work = tmp_path / name
    work.mkdir()
    return Scenarios(harness, [bins.scenarios, work], work / "out.txt")


# --------------------------------------------------------------------------- ckpt


def ckpt_ok(*args: str | Path, reap: subprocess.Popen[bytes] | None = None) -> CkptResult:
    res = run_ckpt(*args, reap=reap)
    assert_ckpt_ok(res)
    return res


def predump(pid: int, images: Path, *extra: str) -> CkptResult:
    return ckpt_ok("predump", "-t", str(pid), "-D", images, *extra)


def final_dump(target: Scenarios, images: Path, prev: str, *extra: str) -> CkptResult:
    """dump --incremental; without --leave-running the target dies: reap it."""
    res = ckpt_ok("dump", "-t", str(target.pid), "-D", images, "--incremental",
                  "--prev-images-dir", prev, *extra, reap=target.proc)
    if "--leave-running" not in extra:
        try:
            target.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"target {target.pid} still runs after dump without --leave-running")
    return res


def show(images: Path) -> dict[str, Any]:
    res = ckpt_ok("show", images, "--json")
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def stats(info: dict[str, Any]) -> dict[str, Any]:
    """inventory.stats with numbers as ints (protobuf JSON writes uint64 as strings and
    leaves out zeros and empty lists)."""
    raw = info["inventory"].get("stats", {})
    out: dict[str, Any] = {k: int(v) if isinstance(v, str) and v.isdigit() else v
                           for k, v in raw.items()}
    for key in ("pages_written", "pages_in_parent", "pages_scanned"):
        out.setdefault(key, 0)
    out["whole_vmas"] = [(int(w.get("start", 0)), int(w.get("end", 0)), w.get("reason", ""))
                         for w in raw.get("whole_vmas", [])]
    return out


def covered_whole(st: dict[str, Any], lo: int, hi: int) -> bool:
    """Some whole-VMA copy covers [lo, hi)."""
    return any(s <= lo and hi <= e for s, e, _ in st["whole_vmas"])


def restore(harness: Harness, images: Path, pid: int, *extra: str) -> None:
    assert harness.restore_detached(images, *extra) == pid
    assert_running_untraced(pid)


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def one_file(images: Path, pattern: str) -> Path:
    found = sorted(images.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {images}: {found}"
    return found[0]


# --------------------------------------------------------------------------- the target alone


def test_scenarios_target_verifies_itself(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """Without ckpt: the target passes its own check at every phase, and a single byte
    changed behind its back (through /proc/PID/mem) makes it report FAIL naming the
    region and page. Its THP region really is backed by huge pages."""
    t = scenarios(harness, bins, tmp_path)
    t.assert_verifies()
    for _ in range(3):
        t.advance()
        t.assert_verifies()
    assert_running_untraced(t.pid)

    thp = t.addr("l")
    smaps = Path(f"/proc/{t.pid}/smaps").read_text()
    sizes = re.findall(r"^([0-9a-f]+)-[0-9a-f]+ .*?^AnonHugePages:\s+(\d+) kB", smaps,
                       re.M | re.S)
    assert any(int(s, 16) == thp and int(kb) > 0 for s, kb in sizes), \
        "region l got no transparent huge page"

    fd = os.open(f"/proc/{t.pid}/mem", os.O_RDWR)
    try:
        at = t.addr("a") + 3 * PAGE + 123  # a page 3: written (non-zero) at setup
        old = os.pread(fd, 1, at)
        os.pwrite(fd, bytes([old[0] ^ 0x40]), at)
    finally:
        os.close(fd)
    line = t.verify()
    assert line.startswith("verify FAIL a 3 "), line
    assert "(total 1 of " in line, line


def test_pages_target_verifies_itself(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """The --pages target: phases check out, and a corrupted byte is reported."""
    out = tmp_path / "out.txt"
    t = Scenarios(harness, [bins.scenarios, "--pages", "50"], out)
    t.advance()
    t.advance()
    t.assert_verifies()
    fd = os.open(f"/proc/{t.pid}/mem", os.O_RDWR)
    try:
        at = t.addr("pages") + 9000 * PAGE + 8
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 1]), at)
    finally:
        os.close(fd)
    line = t.verify()
    assert line.startswith("verify FAIL pages 9000 "), line


# --------------------------------------------------------------------------- the chain


def restore_warm(harness: Harness, passes: list[Path], pid: int) -> None:
    """A warm restore (ckpt.restore.warm, a migration's destination) of the chain: the
    stub follows each pass in turn, and is finished from the last."""
    helper = Path(__file__).with_name("warm_restore.py")
    res = subprocess.run([PYTHON, helper, *map(str, passes)], capture_output=True, text=True,
                         timeout=CKPT_TIMEOUT)
    if res.stdout.strip().isdigit():
        harness.track(int(res.stdout))
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) == pid, res.stderr
    assert "name='2', started=False" in res.stderr, f"pass 2 did not update the stub\n{res.stderr}"
    assert_running_untraced(pid)


@pytest.mark.parametrize("mode", ["restore", "warm", "no-precopy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_restores_every_scenario(harness: Harness, bins: Bins, tmp_path: Path,
                                       backend: str, mode: str) -> None:
    """predump, change, predump --prev, change, dump --incremental, restore the chain:
    every region of every scenario verifies, and the process keeps working (one more
    phase, verified again). The chain really is incremental, and for tracking backends
    the munmap+mmap-in-place VMA (maps unchanged: the seed scenario) and a VMA created
    after the first pass are copied whole. In "warm" mode the restore is built pass by
    pass, as a migration's destination does: every layout change of the scenarios (VMAs
    replaced in place, moved, grown, split by mprotect, pages dropped) is applied to a
    live stub. With uffd-wp the final dump reads the changes before it freezes (while the
    worker threads keep writing) unless "no-precopy"."""
    if mode == "no-precopy" and backend != "uffd-wp":
        pytest.skip("only uffd-wp pre-copies inside the dump")
    require(backend)
    t = scenarios(harness, bins, tmp_path)
    ck = tmp_path / "ck"
    predump(t.pid, ck / "1", f"--track={backend}")
    assert_running_untraced(t.pid, settle=0.5)
    info1 = t.advance()
    predump(t.pid, ck / "2", "--prev-images-dir", "../1")
    assert_running_untraced(t.pid, settle=0.5)
    t.advance()
    res = final_dump(t, ck / "3", "../2", *(["--no-precopy"] if mode == "no-precopy" else []))

    one, two, three = show(ck / "1"), show(ck / "2"), show(ck / "3")
    assert [d["inventory"].get("kind") for d in (one, two, three)] == \
        ["predump", "predump", "dump"]
    assert [d["inventory"].get("parent", "") for d in (one, two, three)] == ["", "../1", "../2"]
    assert {d["inventory"].get("tracker") for d in (one, two, three)} == {backend}
    st2, st3 = stats(two), stats(three)
    # region a alone has 896 pages written at setup, at most 74 of them touched since.
    # Soft-dirty is coarser by design: a VMA that merged with a new neighbour or grew is
    # VM_SOFTDIRTY as a whole (the seed's rule, false positives but never misses), and
    # the scenarios merge several; 512 pages were measured in the guest.
    floor = 256 if backend == "soft-dirty" else 800
    for name, st in (("2", st2), ("3", st3)):
        assert st["pages_in_parent"] >= floor, f"ck/{name} is not incremental: {st}"
    precopied = st3.get("pages_precopied", 0)
    if backend == "uffd-wp" and mode != "no-precopy":
        # the phase's writes, read before the freeze and unchanged since
        assert precopied >= 64 and "before the freeze" in res.stderr, (st3, res.stderr)
        assert f"{precopied} pages read before the freeze" in ckpt_ok("show", ck / "3").stdout
    else:
        assert precopied == 0, st3
    if backend in TRACKING:
        b = t.addr("b")
        assert covered_whole(st2, b, b + 16 * PAGE), \
            f"b (munmap + mmap in place) not copied whole in ck/2: {st2['whole_vmas']}"
        start, npages = info1["i"].split(":")
        i1 = int(start, 16)
        assert covered_whole(st2, i1, i1 + int(npages) * PAGE), \
            f"i1 (new mmap) not copied whole in ck/2: {st2['whole_vmas']}"

    if mode == "warm":
        restore_warm(harness, [ck / "1", ck / "2", ck / "3"], t.pid)
    else:
        restore(harness, ck / "3", t.pid)
    t.assert_verifies()
    t.advance()
    t.assert_verifies()


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_image_holds_only_changed_pages(harness: Harness, bins: Bins,
                                                    tmp_path: Path, backend: str) -> None:
    """64 MiB, all written; the target then writes exactly K pages and blocks in
    sigsuspend. The incremental dump stores at least those K and at most K + SLACK pages;
    everything else is in the parent. SLACK covers what the signal and the printf touch:
    diffing /proc/PID/mem around a phase shows 2 stack pages and 1 bss page changed;
    a tracker also sees pages rewritten with equal bytes (stdout's FILE in libc's data,
    errno in the TLS block). Measured: K+6..7 with uffd-wp, K+2..4 with compare; SLACK 12
    leaves room for the signal frame straddling one more stack page, not for a whole
    VMA (the stack alone is 30+ pages). The target pre-grows its stack and warms that
    path before `ready`, so no VMA grows and no PLT slot is bound afterwards."""
    require(backend)
    k, slack, total = 100, 12, 16384
    t = Scenarios(harness, [bins.scenarios, "--pages", str(k)], tmp_path / "out.txt")
    ck = tmp_path / "ck"
    predump(t.pid, ck / "1", f"--track={backend}")
    first = stats(show(ck / "1"))
    assert first["pages_written"] >= total, f"first predump is not a full copy: {first}"
    t.advance()
    final_dump(t, ck / "2", "../1")

    info = show(ck / "2")
    st = stats(info)
    assert k <= st["pages_written"] <= k + slack, f"{st}"
    assert st["pages_in_parent"] >= total - k, f"{st}"
    proc = info["processes"][0]
    assert proc["pages_here"] <= k + slack and proc["pages_in_parent"] >= total - k, proc

    restore(harness, ck / "2", t.pid)
    line = t.verify()
    assert line == f"verify ok phase=1 pages={total}", line


# --------------------------------------------------------------------------- broken parents


def chain_then_break(harness: Harness, bins: Bins, tmp_path: Path) -> tuple[Scenarios, Path]:
    """predump ck/pre1, one phase, dump --incremental ck/final: the target is dead."""
    t = scenarios(harness, bins, tmp_path)
    ck = tmp_path / "ck"
    predump(t.pid, ck / "pre1")
    t.advance()
    final_dump(t, ck / "final", "../pre1")
    assert not is_alive(t.pid)
    return t, ck


@pytest.mark.parametrize("damage", ["deleted", "corrupted-pages"])
def test_restore_with_broken_parent_fails_cleanly(harness: Harness, bins: Bins,
                                                  tmp_path: Path, damage: str) -> None:
    """The parent of the final dump deleted, or a byte of its page data flipped: restore
    is one `Error:` line naming the parent, non-zero exit, and no process is left (no
    restored or half-built one, no stub, the pid is free)."""
    t, ck = chain_then_break(harness, bins, tmp_path)
    if damage == "deleted":
        shutil.rmtree(ck / "pre1")
    else:
        flip_byte(one_file(ck / "pre1", "pages-*.img"))
    children_before = our_children()

    pidfile = harness.new_pidfile()
    res = run_ckpt("restore", "-D", ck / "final", "-d", "--pidfile", pidfile)
    line = assert_one_error_line(res)
    assert "pre1" in line, f"the error does not name the parent: {line}"
    # (the pid itself may be anyone's by now: other work forks meanwhile)
    assert t.pid not in our_children(), "a failed restore left a process under the pid"
    assert not pids_running(bins.scenarios), "a scenarios process runs after a failed restore"
    assert our_children() <= children_before, "a failed restore left a process behind"


@pytest.mark.parametrize("damage", ["missing", "corrupted-inventory", "truncated-pagemap"])
def test_incremental_dump_with_broken_parent_fails_cleanly(harness: Harness, bins: Bins,
                                                           tmp_path: Path, damage: str) -> None:
    """dump --incremental whose parent does not exist, or has a flipped byte in its
    inventory, or a truncated pagemap: one `Error:` line naming it, at dump time; the
    target runs on untraced and its memory is intact."""
    t = scenarios(harness, bins, tmp_path)
    ck = tmp_path / "ck"
    parent = "nope" if damage == "missing" else "pre1"
    if damage != "missing":
        predump(t.pid, ck / "pre1")
        if damage == "corrupted-inventory":
            flip_byte(ck / "pre1" / "inventory.img")
        else:
            pagemap = one_file(ck / "pre1", "pagemap-*.img")
            os.truncate(pagemap, pagemap.stat().st_size // 2)
    t.advance()

    res = run_ckpt("dump", "-t", str(t.pid), "-D", ck / "final", "--incremental",
                   "--prev-images-dir", f"../{parent}", reap=t.proc)
    line = assert_one_error_line(res)
    assert parent in line, f"the error does not name the parent: {line}"
    assert t.proc.poll() is None, "the target died"
    assert_running_untraced(t.pid)
    t.assert_verifies()


# --------------------------------------------------------------------------- leftovers


def vmas_with_flag(pid: int, flag: str) -> list[str]:
    """Heads of the smaps entries whose VmFlags contain flag."""
    found, head = [], ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("VmFlags:"):
            if flag in line.split()[1:]:
                found.append(head)
        elif not line[:1].isupper():
            head = line
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_passes_leave_no_trace(harness: Harness, bins: Bins, tmp_path: Path,
                               backend: str) -> None:
    """Predumps leave the target running and untraced, its own fds untouched; between
    passes one extra fd may hold the tracking (a userfaultfd, at a high number, out of the
    way of the program's next open()). The final dump --leave-running (no --track-mem)
    leaves exactly the original fds and no registered VMA; the target is intact, and the
    chain restores after it is killed."""
    require(backend)
    t = scenarios(harness, bins, tmp_path)
    fds = fd_links(t.pid)
    ck = tmp_path / "ck"

    def check_between_passes() -> None:
        assert_running_untraced(t.pid, settle=0.5)
        now = fd_links(t.pid)
        assert {fd: now.get(fd) for fd in fds} == fds, f"own fds changed: {fds} -> {now}"
        extra = {fd: link for fd, link in now.items() if fd not in fds}
        assert len(extra) <= 1, f"more than one stray fd: {extra}"
        for fd, link in extra.items():
            assert fd >= 100, f"tracking fd {fd} ({link}) is not out of the way"
            if backend == "uffd-wp":
                assert link == "anon_inode:[userfaultfd]", extra

    predump(t.pid, ck / "1", f"--track={backend}")
    check_between_passes()
    t.advance()
    predump(t.pid, ck / "2", "--prev-images-dir", "../1")
    check_between_passes()
    t.advance()
    final_dump(t, ck / "3", "../2", "--leave-running")
    at_dump = t.out.stat().st_size

    assert t.proc.poll() is None, "target died despite --leave-running"
    assert_running_untraced(t.pid)
    assert fd_links(t.pid) == fds, "the final dump left an fd behind"
    assert not vmas_with_flag(t.pid, "uw"), "VMAs still registered for uffd-wp"
    t.assert_verifies()

    harness.kill(t.pid)
    # the restored process writes from the dump-time offset again: drop what the
    # original wrote after the dump so its lines are not mistaken for the copy's
    os.truncate(t.out, at_dump)
    restore(harness, ck / "3", t.pid, "--skip-file-check")  # the file changed: on purpose
    t.assert_verifies()


def test_foreign_tracker_state_falls_back_to_whole_copies(harness: Harness, bins: Bins,
                                                          tmp_path: Path) -> None:
    """Tracking state that is not this process's must not be trusted. Our target is
    predumped with uffd-wp (its userfaultfd stays in it), but the tracker image of ck/1
    is replaced by another target's (same program: other pid and start time, fd and
    inode). The next predump copies whole VMAs (or counts every page dirty) instead of
    trusting that state; the final dump leaves nothing behind and the chain verifies."""
    require("uffd-wp")
    t = scenarios(harness, bins, tmp_path, "a")
    other = scenarios(harness, bins, tmp_path, "b")
    fds = fd_links(t.pid)
    ck, ck_other = tmp_path / "ck", tmp_path / "ck-other"
    predump(t.pid, ck / "1", "--track=uffd-wp")
    predump(other.pid, ck_other / "1", "--track=uffd-wp")
    ours = one_file(ck / "1", "tracker-*.img")
    shutil.copyfile(one_file(ck_other / "1", "tracker-*.img"), ours)
    harness.kill(other.pid)

    t.advance()
    predump(t.pid, ck / "2", "--prev-images-dir", "../1")
    first, st = stats(show(ck / "1")), stats(show(ck / "2"))
    a = t.addr("a")
    # region a (untouched but for 37 pages) among the whole copies, or every page counted
    # dirty; a pass trusting the tracking would store ~60% of a full one
    assert covered_whole(st, a, a + 1024 * PAGE) or \
        st["pages_written"] >= 0.95 * first["pages_written"], \
        f"foreign tracking state was trusted: ck/1 {first}, ck/2 {st}"
    t.advance()
    final_dump(t, ck / "3", "../2", "--leave-running")
    assert fd_links(t.pid) == fds, "a tracking fd was left behind"
    assert stats(show(ck / "3"))["pages_in_parent"] >= 800, "ck/3 is not incremental"
    harness.kill(t.pid)
    # the original wrote on after the --leave-running dump
    restore(harness, ck / "3", t.pid, "--skip-file-check")
    t.assert_verifies()


def test_unavailable_backend_is_one_error_line(harness: Harness, bins: Bins,
                                               tmp_path: Path) -> None:
    """Asking for soft-dirty where the kernel lacks it: one `Error:` line, target untouched."""
    if backend_missing("soft-dirty") is None:
        pytest.skip("this kernel has soft-dirty")
    t = scenarios(harness, bins, tmp_path)
    res = run_ckpt("predump", "-t", str(t.pid), "-D", tmp_path / "ck", "--track=soft-dirty")
    line = assert_one_error_line(res)
    assert "soft-dirty" in line, line
    assert_running_untraced(t.pid)
    t.assert_verifies()


# --------------------------------------------------------------------------- snapshots


def test_track_mem_snapshots_chain(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """CRIU's snapshot mode: `dump --leave-running --track-mem` keeps tracking armed, so
    each snapshot is restorable and the next one stores only what changed since."""
    require("uffd-wp")
    k, slack, total = 100, 12, 16384
    t = Scenarios(harness, [bins.scenarios, "--pages", str(k)], tmp_path / "out.txt")
    ck = tmp_path / "ck"
    ckpt_ok("dump", "-t", str(t.pid), "-D", ck / "1", "--leave-running", "--track-mem")
    assert stats(show(ck / "1"))["pages_written"] >= total
    t.advance()
    ckpt_ok("dump", "-t", str(t.pid), "-D", ck / "2", "--leave-running", "--track-mem",
            "--prev-images-dir", "../1")
    st = stats(show(ck / "2"))
    assert k <= st["pages_written"] <= k + slack, st
    t.advance()
    final_dump(t, ck / "3", "../2")
    st = stats(show(ck / "3"))
    assert k <= st["pages_written"] <= k + slack, st
    restore(harness, ck / "3", t.pid)
    assert t.verify() == f"verify ok phase=2 pages={total}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_cow_page_of_file_mapping(harness: Harness, tmp_path: Path,
                                          backend: str) -> None:
    """MADV_DONTNEED on a COW'd page of a private file mapping brings the file's bytes
    back; uffd-wp does not see it as a write, so "in parent" would resurrect the copy."""
    require(backend)
    out = tmp_path / "out.txt"
    target = harness.launch([*py_target("fileprivate.py"), tmp_path], out)
    wait_for_line(out, lambda s: s == "ready", 20, "ready")
    ck = tmp_path / "ck"
    predump(target.pid, ck / "1", f"--track={backend}")
    os.kill(target.pid, signal.SIGUSR1)
    wait_for_line(out, lambda s: s == "phase=1 done", 20, "phase=1 done")
    ckpt_ok("dump", "-t", str(target.pid), "-D", ck / "2", "--incremental",
            "--prev-images-dir", "../1", reap=target)
    target.wait(timeout=10)
    restore(harness, ck / "2", target.pid)
    os.kill(target.pid, signal.SIGUSR2)
    line = wait_for_line(out, lambda s: s.startswith("verify"), 20, "verify")
    assert line == "verify ok", line
