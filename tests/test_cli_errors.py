"""Bad input reaches the user as one `Error: ...` line and a non-zero exit, never a
traceback, and never hurts the target: it is still running, untraced, afterwards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    Bins,
    Harness,
    assert_one_error_line,
    assert_running_untraced,
    ctx_switches,
    find_kernel_thread,
    is_alive,
    needs_root,
    pids_running,
    py_target,
    read_lines,
    require_reachable_by_others,
    run_ckpt,
    thread_ids,
    wait_for_lines,
)

from ckpt.images import ImageDir

pytestmark = needs_root

UNUSED_PID = 4194000  # above any pid_max on x86-64 (4194304 is the limit)


def assert_untouched(proc: subprocess.Popen[bytes], out: Path) -> None:
    """The target is alive, untraced, and still making progress."""
    assert proc.poll() is None, f"target died (status {proc.returncode})"
    assert_running_untraced(proc.pid)
    wait_for_lines(out, len(read_lines(out)) + 2)


# --------------------------------------------------------------------------- dump


def test_dump_unknown_pid(harness: Harness) -> None:
    assert not is_alive(UNUSED_PID)
    res = run_ckpt("dump", "-t", str(UNUSED_PID), "-D", harness.images())
    assert str(UNUSED_PID) in assert_one_error_line(res)


def test_dump_kernel_thread(harness: Harness) -> None:
    kthread = find_kernel_thread()
    if kthread is None:
        pytest.skip("no kernel thread visible (pid namespace)")
    res = run_ckpt("dump", "-t", str(kthread), "-D", harness.images(), "--leave-running")
    assert_one_error_line(res)
    assert is_alive(kthread)


def test_dump_unsupported_socket_fd(harness: Harness, tmp_path: Path) -> None:
    """A socket is refused before the target is frozen: the message names the fd and
    its kind, and the idle target was never interrupted (no extra context switch)."""
    out = tmp_path / "out.txt"
    proc = harness.launch(py_target("socket_holder.py"), out)
    line = wait_for_lines(out, 1)[0]
    assert line.startswith("ready fd="), line
    fd = int(line.removeprefix("ready fd="))
    switches = ctx_switches(proc.pid)

    res = run_ckpt("dump", "-t", str(proc.pid), "-D", harness.images())
    message = assert_one_error_line(res)
    assert "socket" in message and str(fd) in message, message
    assert proc.poll() is None, "target died"
    assert_running_untraced(proc.pid)
    assert ctx_switches(proc.pid) == switches, "the target was interrupted (frozen?)"


TRACER = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:  # PTRACE_SEIZE
    sys.exit(1)
print("seized", flush=True)
time.sleep(60)
"""


def test_dump_target_already_traced(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """A target under another tracer (a debugger) is refused with the tracer's pid; it
    keeps running and is left to that tracer."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 2)
    tracer = harness.launch([sys.executable, "-c", TRACER, str(proc.pid)], tmp_path / "t.txt")
    wait_for_lines(tmp_path / "t.txt", 1)

    res = run_ckpt("dump", "-t", str(proc.pid), "-D", harness.images())
    message = assert_one_error_line(res)
    assert f"already traced by process {tracer.pid}" in message, message
    harness.kill(tracer.pid)
    assert_untouched(proc, out)


def test_dump_track_mem_needs_leave_running(harness: Harness, bins: Bins,
                                            tmp_path: Path) -> None:
    """--track-mem keeps tracking armed for the next snapshot of a process left running:
    without --leave-running it is refused up front, and the target is not killed."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 2)
    res = run_ckpt("dump", "-t", str(proc.pid), "-D", harness.images(), "--track-mem")
    assert "--leave-running" in assert_one_error_line(res)
    assert_untouched(proc, out)


# --------------------------------------------------------------------------- restore


def test_restore_missing_dir(tmp_path: Path) -> None:
    assert_one_error_line(run_ckpt("restore", "-D", tmp_path / "nope", "--restore-detached"))


def test_restore_empty_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_error_line(run_ckpt("restore", "-D", empty, "--restore-detached"))


@dataclass(frozen=True)
class Dumped:
    """A counter dumped with --leave-running, still running."""

    proc: subprocess.Popen[bytes]
    exe: Path
    out: Path
    images: Path

    def image(self, pattern: str) -> Path:
        found = sorted(self.images.glob(pattern))
        listing = sorted(p.name for p in self.images.iterdir())
        assert found, f"no {pattern} in the images dir: {listing}"
        return found[0]


@pytest.fixture
def dumped(harness: Harness, bins: Bins, tmp_path: Path) -> Dumped:
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn], out)
    wait_for_lines(out, 3)
    images = harness.images()
    harness.dump(proc.pid, images, "--leave-running")
    assert_untouched(proc, out)
    return Dumped(proc, bins.counter_dyn, out, images)


def restore_new_pid_fails(harness: Harness, dumped: Dumped) -> str:
    """Restore (under a new pid: the original still runs) must fail cleanly, leave
    nothing half-built behind, and not disturb the original (whose output file grew
    since the dump: that check is test_files_check's)."""
    res = run_ckpt("restore", "-D", dumped.images, "--new-pid", "--restore-detached",
                   "--skip-file-check", "--pidfile", harness.new_pidfile())
    message = assert_one_error_line(res)
    assert pids_running(dumped.exe) == {dumped.proc.pid}, "a half-restored process is left"
    assert_untouched(dumped.proc, dumped.out)
    return message


def test_restore_pid_taken(dumped: Dumped) -> None:
    res = run_ckpt("restore", "-D", dumped.images, "--restore-detached")
    message = assert_one_error_line(res)
    assert str(dumped.proc.pid) in message, message
    assert pids_running(dumped.exe) == {dumped.proc.pid}
    assert_untouched(dumped.proc, dumped.out)


def test_restore_truncated_pages(harness: Harness, dumped: Dumped) -> None:
    pages = dumped.image("pages-*.img")
    size = pages.stat().st_size
    assert size > 0
    os.truncate(pages, size // 2)
    restore_new_pid_fails(harness, dumped)


def test_restore_corrupted_pages(harness: Harness, dumped: Dumped) -> None:
    pages = dumped.image("pages-*.img")
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pages.write_bytes(bytes(data))
    restore_new_pid_fails(harness, dumped)


@pytest.mark.parametrize("pattern", ["inventory.img", "core-*.img"])
def test_restore_wrong_magic(harness: Harness, dumped: Dumped, pattern: str) -> None:
    image = dumped.image(pattern)
    data = image.read_bytes()
    assert data[:4] == b"CKPT", f"{image.name} does not start with the CKPT magic"
    image.write_bytes(b"JUNK" + data[4:])
    restore_new_pid_fails(harness, dumped)


def test_restore_other_cpu_xstate(harness: Harness, dumped: Dumped) -> None:
    """An image whose XSTATE layout this CPU cannot take is refused before anything is
    built, naming the cause."""
    images = ImageDir.open(dumped.images)
    core = images.read_core(dumped.proc.pid)
    for thread in core.threads:
        thread.xstate = thread.xstate[:512]  # legacy FXSAVE area only: another CPU
    images.write_core(dumped.proc.pid, core)
    assert "XSTATE" in restore_new_pid_fails(harness, dumped)


def test_dump_disk_full(harness: Harness, tmp_path: Path) -> None:
    """No space for the images: one error line, no half-written images (not even the
    directory the dump created), target runs on."""
    out = tmp_path / "out.txt"
    proc = harness.launch([*py_target("bigmem.py"), "--mib", "16"], out)
    wait_for_lines(out, 2, timeout=30)
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        res = run_ckpt("dump", "-t", str(proc.pid), "-D", small / "images")
        message = assert_one_error_line(res)
        assert "No space left on device" in message, message
        assert not (small / "images").exists()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    assert_untouched(proc, out)


NOBODY = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")


def test_check_as_non_root_cannot_choose_pids() -> None:
    """ns_last_pid is mode 0666, so opening it proves nothing: for a non-root user the
    probe's write fails, `check` says so, and --feature makes that the exit status."""
    require_reachable_by_others()
    res = run_ckpt("check", "--feature", "ns-last-pid", prefix=NOBODY)
    assert "ns-last-pid" in assert_one_error_line(res)
    assert re.search(r"^NO  ns-last-pid .*not permitted", res.stdout, re.M), res.stdout
    assert "restore: pids cannot be chosen: use --new-pid" in res.stdout
    assert run_ckpt("check", "--feature", "ns-last-pid").returncode == 0


@pytest.mark.parametrize("args", [("dump",), ("dump", "-t", "abc", "-D", "x"),
                                  ("restore",), ("nosuchcommand",)])
def test_usage_errors_are_one_line(args: tuple[str, ...]) -> None:
    assert_one_error_line(run_ckpt(*args))


# --------------------------------------------------------------------------- PID reuse

THREADED = """
import threading, time
threading.Thread(target=time.sleep, args=(1e6,), daemon=True).start()
print("ready", flush=True)
time.sleep(1e6)
"""


def spawn_at(pid: int, harness: Harness, tmp_path: Path) -> subprocess.Popen[bytes] | None:
    """A `sleep` under exactly ``pid`` (ns_last_pid, as restore does it), or None if
    other forks kept taking it."""
    for _ in range(50):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        proc = harness.launch(["sleep", "60"], tmp_path / "sleep.txt")
        if proc.pid == pid:
            return proc
        harness.kill(proc.pid)
    return None


def test_restore_names_the_process_holding_a_thread_id(harness: Harness,
                                                       tmp_path: Path) -> None:
    """PID reuse: a process started after the dump holds one of the dumped thread ids.
    The restore says which process, in words that tell it from a mistake of ckpt's."""
    out = tmp_path / "out.txt"
    proc = harness.launch([sys.executable, "-c", THREADED], out)
    wait_for_lines(out, 1)
    tids = sorted(thread_ids(proc.pid) - {proc.pid})
    assert tids, "the target has no second thread"
    images = harness.images()
    harness.dump_and_reap(proc, images)
    holder = spawn_at(tids[0], harness, tmp_path)
    if holder is None:
        pytest.skip(f"could not start a process under pid {tids[0]}")

    res = run_ckpt("restore", "-D", images, "--restore-detached")
    message = assert_one_error_line(res)
    assert f"thread id {tids[0]} is taken by process {tids[0]} (sleep)" in message, message
    assert "--new-pid" in message
    assert not is_alive(proc.pid), "a half-restored process is left"
