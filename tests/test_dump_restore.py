"""End-to-end dump/restore of real processes with the installed `ckpt` command.

Every target is deterministic, so a test can say exactly what the output must be after
the restore: the same sequence, continued from the dump point, in the same file at the
right offset, by the same pid (and thread ids).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import (
    Bins,
    Harness,
    assert_bigmem_reference,
    assert_ckpt_ok,
    assert_running_untraced,
    bigmem_dumped,
    check_counter_file,
    fd_links,
    is_alive,
    needs_root,
    py_target,
    read_lines,
    run_ckpt,
    same_open_file,
    thread_ids,
    wait_for,
    wait_for_line,
    wait_for_lines,
)

from ckpt.collect.maps import read_smaps_vmflags

pytestmark = needs_root


def counter_argv(bins: Bins, kind: str, out: Path) -> Sequence[str | Path]:
    """counter_static writes to a file it opened itself (-o); the others to stdout."""
    if kind == "c-dynamic":
        return [bins.counter_dyn]
    if kind == "c-shared-anon":
        return [bins.counter_dyn, "-s"]
    if kind == "c-static":
        return [bins.counter_static, "-o", out]
    return py_target("counter.py")


def stop(harness: Harness, pid: int) -> None:
    harness.kill(pid)
    assert not is_alive(pid)


# --------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("kind", ["c-dynamic", "c-static", "c-shared-anon", "python"])
def test_counter_continues_exactly(harness: Harness, bins: Bins, tmp_path: Path,
                                   kind: str) -> None:
    """Dump (kills), restore detached: same pid, same fds on the same file, the shared
    stdout/stderr offset, and the sequence continues with no gap, repeat or hole."""
    log = tmp_path / "log.txt"
    out = tmp_path / "out.txt" if kind == "c-static" else log
    proc = harness.launch(counter_argv(bins, kind, out), log)
    wait_for_lines(out, 5)
    pid = proc.pid
    fds_before = fd_links(pid)
    out_fd = next(fd for fd, link in fds_before.items() if link == str(out))
    assert same_open_file(pid, 1, 2)
    inode = out.stat().st_ino

    images = harness.images()
    harness.dump_and_reap(proc, images)
    at_dump = len(check_counter_file(out))

    assert harness.restore_detached(images) == pid
    wait_for_lines(out, at_dump + 10)
    assert_running_untraced(pid)
    assert fd_links(pid) == fds_before
    assert os.stat(f"/proc/{pid}/fd/{out_fd}").st_ino == inode
    assert same_open_file(pid, 1, 2), "stdout and stderr no longer share one open file"

    stop(harness, pid)
    pids = check_counter_file(out)
    assert len(pids) >= at_dump + 10
    assert set(pids) == {pid}


# --------------------------------------------------------------------------- (b)


def test_leave_running_then_restore(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """--leave-running: the target keeps running untraced. After killing it, the restore
    resumes from the dump point: fixed-width line n lands at offset (n-1)*len, so the
    restored copy rewrites the lines the original wrote after the dump with identical
    bytes and the file stays one exact sequence."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 5)
    images = harness.images()
    harness.dump(proc.pid, images, "--leave-running")
    at_dump = len(read_lines(out))

    assert proc.poll() is None, "target died although --leave-running was given"
    assert_running_untraced(proc.pid)
    wait_for_lines(out, at_dump + 3)

    harness.kill(proc.pid)
    at_kill = len(check_counter_file(out))

    # the file grew after the dump: a restore is refused unless asked (test_files_check)
    assert harness.restore_detached(images, "--skip-file-check") == proc.pid
    wait_for_lines(out, at_kill + 5)
    assert_running_untraced(proc.pid)
    stop(harness, proc.pid)
    assert set(check_counter_file(out)) == {proc.pid}


# --------------------------------------------------------------------------- (h)


def test_new_pid_while_original_runs(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """Restore --new-pid while the original still holds its pid: the copy runs under
    another pid and continues from the dump point in the same file (line n at offset
    (n-1)*len), so the file ends as: original's lines 1..k, the copy's lines k+1..N."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 5)
    before = len(read_lines(out))
    images = harness.images()
    harness.dump(proc.pid, images, "--leave-running")
    after = len(read_lines(out))

    new = harness.restore_detached(images, "--new-pid", "--skip-file-check")
    assert new != proc.pid
    assert proc.poll() is None, "original died"
    assert_running_untraced(proc.pid)
    assert_running_untraced(new)
    wait_for_line(out, lambda line: line.endswith(f"pid={new:07d}"), 10, "a line by the copy")

    harness.kill(proc.pid)
    at_kill = len(read_lines(out))
    wait_for_lines(out, at_kill + 5)
    stop(harness, new)

    pids = check_counter_file(out)
    k = pids.index(new)
    assert before <= k <= after, f"copy resumed after line {k}, dump was at {before}..{after}"
    assert set(pids[:k]) == {proc.pid}
    assert set(pids[k:]) == {new}


# --------------------------------------------------------------------------- (i)


def test_restore_waits_and_returns_exit_status(harness: Harness, bins: Bins,
                                               tmp_path: Path) -> None:
    """Without --restore-detached ckpt waits for the process and exits with its status."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-n", "100", "-x", "42"], out)
    wait_for_lines(out, 5)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    harness.track(proc.pid)

    res = run_ckpt("restore", "-D", images, timeout=30)
    assert res.returncode == 42, res.describe()
    assert not is_alive(proc.pid)
    assert check_counter_file(out) == [proc.pid] * 100


# --------------------------------------------------------------------------- (c)


def test_bigmem_checksums(harness: Harness, tmp_path: Path) -> None:
    """A 64 MiB buffer: every digest after restore equals a fresh reference run's."""
    out = tmp_path / "out.txt"
    pid, images, at_dump = bigmem_dumped(harness, out)
    assert harness.restore_detached(images) == pid
    wait_for_lines(out, at_dump + 3, timeout=30)
    assert_running_untraced(pid)
    stop(harness, pid)
    assert_bigmem_reference(out)


# --------------------------------------------------------------------------- (d)

THREAD_RE = re.compile(r"t(\d) (\d+) tid=(\d+)")


def thread_progress(lines: list[str]) -> dict[int, list[tuple[int, int]]]:
    """thread index -> [(count, tid)] in file order."""
    seen: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for line in lines:
        match = THREAD_RE.fullmatch(line)
        assert match, f"malformed line {line!r}"
        seen[int(match.group(1))].append((int(match.group(2)), int(match.group(3))))
    return seen


def test_threads_continue_with_same_tids(harness: Harness, tmp_path: Path) -> None:
    """Main + 3 threads: all continue counting after restore, with their old TIDs."""
    out = tmp_path / "out.txt"
    proc = harness.launch(py_target("threads.py"), out)

    def all_counting(least: int) -> bool:
        seen = thread_progress(read_lines(out))
        return len(seen) == 4 and all(len(v) >= least for v in seen.values())

    wait_for(lambda: all_counting(3), 10, "4 counting threads")
    tids = thread_ids(proc.pid)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    at_dump = {k: v[-1][0] for k, v in thread_progress(read_lines(out)).items()}

    assert harness.restore_detached(images) == proc.pid
    wait_for(lambda: all_counting(max(at_dump.values()) + 5), 10, "all threads to continue")
    assert_running_untraced(proc.pid)
    assert thread_ids(proc.pid) == tids
    # restore runs the stub on ckpt's CPU meanwhile (Stub.colocated): no thread keeps that
    assert all(os.sched_getaffinity(t) == os.sched_getaffinity(0) for t in tids)
    stop(harness, proc.pid)

    seen = thread_progress(read_lines(out))
    assert sorted(seen) == [0, 1, 2, 3]
    for k, steps in seen.items():
        counts = [c for c, _ in steps]
        assert counts == list(range(1, len(counts) + 1)), f"t{k} skipped or repeated"
        assert len(counts) > at_dump[k]
        assert {tid for _, tid in steps} <= tids and len({tid for _, tid in steps}) == 1
    assert {steps[0][1] for steps in seen.values()} == tids
    assert seen[0][0][1] == proc.pid


# --------------------------------------------------------------------------- (e)


def test_fpu_bit_identical(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """AVX-512 accumulators and MXCSR (round-toward-zero) survive a dump taken mid-round:
    every line equals a fresh reference run's, bit for bit."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.fpu], out)
    wait_for_lines(out, 3)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    at_dump = len(read_lines(out))

    assert harness.restore_detached(images) == proc.pid
    wait_for_lines(out, at_dump + 5)
    assert_running_untraced(proc.pid)
    stop(harness, proc.pid)

    got = read_lines(out)
    ref = subprocess.run([str(bins.fpu), "-n", str(len(got))], capture_output=True, text=True,
                         timeout=60, check=True)
    assert got == ref.stdout.splitlines()


# --------------------------------------------------------------------------- (f)

SLEEP_S = 2
SLEEP_RE = re.compile(r"n=(\d+) slept_ms=(\d+) eintr=(\d+)")


def test_nanosleep_resumes(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """Dumped inside nanosleep(2 s): after restore the sleep completes (not early, not
    never), the next line has the next number, and later sleeps are normal."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.sleeper, "sleep", str(SLEEP_S)], out)
    wait_for_lines(out, 1)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    assert len(read_lines(out)) == 1, "the dump took too long to catch the first sleep"

    assert harness.restore_detached(images) == proc.pid
    restored_at = time.monotonic()
    lines = wait_for_lines(out, 2, timeout=SLEEP_S + 3)
    woke_after = time.monotonic() - restored_at
    assert_running_untraced(proc.pid)
    match = SLEEP_RE.fullmatch(lines[1])
    assert match and match.group(1) == "2", lines
    assert int(match.group(2)) >= SLEEP_S * 1000, f"sleep ended early: {lines[1]}"
    assert woke_after <= SLEEP_S + 1.5

    lines = wait_for_lines(out, 3, timeout=SLEEP_S + 3)
    match = SLEEP_RE.fullmatch(lines[2])
    assert match and match.group(1) == "3", lines
    assert SLEEP_S * 1000 <= int(match.group(2)) < SLEEP_S * 1000 + 1000, lines[2]


WAIT_RE = re.compile(r"n=(\d+) got=(\w+) usr1=(\d+) eintr=(\d+)")


def test_sigtimedwait_resumes(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """Dumped inside sigtimedwait(SIGUSR1, 2 s) with SIGUSR1 blocked: after restore a
    SIGUSR1 is collected by the wait (mask kept, call resumed) and timeouts still work."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.sleeper, "wait", str(SLEEP_S)], out)
    wait_for_lines(out, 1)
    proc.send_signal(signal.SIGUSR1)
    wait_for_line(out, lambda line: "got=usr1 usr1=1" in line, 5, "first SIGUSR1")
    images = harness.images()
    harness.dump_and_reap(proc, images)
    at_dump = len(read_lines(out))

    assert harness.restore_detached(images) == proc.pid
    os.kill(proc.pid, signal.SIGUSR1)
    wait_for_line(out, lambda line: "got=usr1 usr1=2" in line, 5, "SIGUSR1 after restore")
    wait_for(lambda: "got=timeout" in read_lines(out)[-1], SLEEP_S + 2, "a timed-out wait")
    assert_running_untraced(proc.pid)
    stop(harness, proc.pid)

    lines = read_lines(out)
    numbers = [int(m.group(1)) for m in map(WAIT_RE.fullmatch, lines[1:]) if m]
    assert len(numbers) == len(lines) - 1, f"malformed lines: {lines}"
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(lines) > at_dump + 1


# --------------------------------------------------------------------------- (g)

SIG_RE = re.compile(r"tick=(\d+) usr1=(\d+) usr2=(\d+) blocked_hup=(\d) pending_hup=(\d)"
                    r" usr1_flags=(\w+) usr2_mask_term=(\d)")


def sig_state(line: str) -> tuple[int, ...]:
    match = SIG_RE.fullmatch(line)
    assert match, f"malformed line {line!r}"
    return tuple(int(v, 0) for v in match.groups())


def test_signal_handlers_and_mask(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """Handlers (with their flags and sa_mask) and the blocked SIGHUP survive: SIGUSR1/2
    still count, SIGHUP stays blocked (pending, not fatal)."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.signals], out)
    wait_for_lines(out, 2)
    proc.send_signal(signal.SIGUSR1)
    proc.send_signal(signal.SIGUSR2)
    wait_for_line(out, lambda line: " usr1=1 usr2=1 " in line, 5, "handlers to run")
    images = harness.images()
    harness.dump_and_reap(proc, images)
    lines = read_lines(out)
    at_dump = sig_state(lines[-1])
    assert at_dump[1:] == (1, 1, 1, 0, 0x50000000, 1), lines[-1]

    pid = harness.restore_detached(images)
    assert pid == proc.pid
    wait_for_lines(out, len(lines) + 2)
    assert sig_state(read_lines(out)[-1])[1:] == at_dump[1:]

    os.kill(pid, signal.SIGUSR1)
    os.kill(pid, signal.SIGHUP)
    wait_for_line(out, lambda line: " usr1=2 usr2=1 blocked_hup=1 pending_hup=1 " in line, 5,
                  "SIGUSR1 counted and SIGHUP pending")
    os.kill(pid, signal.SIGUSR2)
    wait_for_line(out, lambda line: " usr1=2 usr2=2 blocked_hup=1 pending_hup=1 " in line, 5,
                  "SIGUSR2 counted")
    assert_running_untraced(pid)
    stop(harness, pid)
    ticks = [sig_state(line)[0] for line in read_lines(out)]
    assert ticks == list(range(1, len(ticks) + 1))


def test_pending_signal_survives(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """A blocked SIGHUP pending at dump time is still pending after restore."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.signals], out)
    wait_for_lines(out, 2)
    proc.send_signal(signal.SIGHUP)
    wait_for_line(out, lambda line: "pending_hup=1" in line, 5, "SIGHUP pending")
    images = harness.images()
    harness.dump_and_reap(proc, images)
    at_dump = len(read_lines(out))

    assert harness.restore_detached(images) == proc.pid
    lines = wait_for_lines(out, at_dump + 2)
    assert all(sig_state(line)[4] == 1 for line in lines[at_dump:]), lines[at_dump:]


# --------------------------------------------------------------------------- show / check


def test_show_and_check(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """`ckpt show` (text and --json) describes a dump; `ckpt check` lists features."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 2)
    images = harness.images()
    harness.dump(proc.pid, images, "--leave-running")
    assert_running_untraced(proc.pid)

    text = run_ckpt("show", images)
    assert_ckpt_ok(text)
    assert str(proc.pid) in text.stdout
    as_json = run_ckpt("show", images, "--json")
    assert_ckpt_ok(as_json)
    assert str(proc.pid) in json.dumps(json.loads(as_json.stdout))

    check = run_ckpt("check")
    assert_ckpt_ok(check)
    assert check.stdout.strip()


def test_vma_flags_survive(harness: Harness, tmp_path: Path) -> None:
    """A VMA's madvise flags (THP hints, dontdump, dontfork, wipeonfork, KSM, readahead),
    mlock state and MAP_NORESERVE are the same after restore: each region's VmFlags as
    smaps shows them."""
    out = tmp_path / "out.txt"
    proc = harness.launch(py_target("madvised.py"), out)
    wait_for_line(out, lambda s: s == "ready", 20, "ready")
    named = {s.split()[2].split("=")[1]: int(s.split()[1].split("=")[1], 16)
             for s in read_lines(out) if s.startswith("region ")}
    regions = list(named.values())
    assert len(regions) >= 8
    flags = read_smaps_vmflags(proc.pid)
    before = {a: flags[a] for a in regions}
    images = harness.images()
    harness.dump_and_reap(proc, images)

    assert harness.restore_detached(images) == proc.pid
    flags = read_smaps_vmflags(proc.pid)
    assert {a: flags.get(a) for a in regions} == before
    huge = named.get("NORESERVE")  # 1 TiB: only its two written pages were stored
    if huge is not None:  # (not with strict overcommit, which ignores MAP_NORESERVE)
        with open(f"/proc/{proc.pid}/mem", "rb", buffering=0) as mem:
            got = [mem.seek(a) and mem.read(4) for a in (huge, huge + (1 << 40) - 4096,
                                                         huge + 4096)]
        assert got == [b"\x09" * 4, b"\x0a" * 4, bytes(4)]
    assert_running_untraced(proc.pid)
    stop(harness, proc.pid)
