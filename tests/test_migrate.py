"""`ckpt migrate` to a page server on this host: the process goes on at the destination
without a gap; when the destination cannot restore it, the source runs on untouched."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Bins,
    Harness,
    assert_one_error_line,
    assert_running_untraced,
    ckpt_command,
    is_alive,
    needs_root,
    our_children,
    proc_status,
    py_target,
    read_lines,
    run_ckpt,
    wait_for,
    wait_for_line,
    wait_for_lines,
)
from test_stopped import all_stopped, stop
from test_transfer import make_cert

from ckpt.actions.migrate import Throttle
from ckpt.errors import RestoreError
from ckpt.transfer import serve
from ckpt.transfer.client import commit_remote, connect, restore_remote, send_pass_on
from ckpt.transfer.wire import TransferError, server_tls_context

pytestmark = needs_root
NUM = re.compile(r"n=(\d+) .* pid=(\d+)")


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An in-process page server thread on a free loopback port: (HOST:PORT, token)."""
    token = tmp_path / "token"
    token.write_text("migrate-me\n")
    yield f"127.0.0.1:{start_server(tmp_path / 'dest')}", token


def start_server(dest: Path, **kwargs: Any) -> int:
    """serve() on a thread of this process, on a free loopback port; returns the port."""
    ready = threading.Event()
    port: list[int] = []

    def started(p: int) -> None:
        port.append(p)
        ready.set()

    threading.Thread(target=serve, args=("127.0.0.1", 0, dest, b"migrate-me"),
                     kwargs={"ready": started, **kwargs}, daemon=True).start()
    assert ready.wait(10), "page server did not start"
    return port[0]


def numbers(out: Path) -> list[tuple[int, int]]:
    """(n, pid) of every progress line; every line must be one."""
    lines = read_lines(out)
    found = [(int(m[1]), int(m[2])) for line in lines if (m := NUM.search(line))]
    assert len(found) == len(lines) > 0, f"unexpected output: {lines[:3]}"
    return found


@pytest.mark.parametrize("target", ["c", "python"])
def test_migrate_continues_at_destination(harness: Harness, bins: Bins, tmp_path: Path,
                                         page_server: tuple[str, Path], target: str) -> None:
    address, token = page_server
    out = tmp_path / "out.txt"
    if target == "c":
        proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    else:
        proc = harness.launch(py_target("counter.py"), out)
    wait_for_lines(out, 5)
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address, "--auth-token-file", token,
                   reap=proc)
    assert res.returncode == 0, res.describe()
    assert "downtime" in res.stdout and re.search(r"round 1: \d+ dirty pages", res.stdout)
    # the destination built the process during the rounds: only the last pass was left
    assert "(warm)" in res.stdout and "destination caught up" in res.stdout, res.stdout
    new_pid = int(re.search(r"as pid (\d+)", res.stdout)[1])  # type: ignore[index]
    harness.track(new_pid)
    # as many round lines as the summary counts rounds, the final one included
    rounds = re.findall(r"^round (\d+)", res.stdout, re.M)
    assert f": {len(rounds)} rounds," in res.stdout and rounds[-1] == str(len(rounds)), \
        res.stdout
    proc.wait(timeout=10)  # the source is gone
    before = len(read_lines(out))
    wait_for_lines(out, before + 5)
    assert_running_untraced(new_pid)
    seq = numbers(out)
    assert [n for n, _ in seq] == list(range(1, len(seq) + 1)), "a gap or a repeat"
    assert {p for _, p in seq} == {proc.pid, new_pid}


def test_failed_restore_leaves_source_running(harness: Harness, bins: Bins, tmp_path: Path,
                                              page_server: tuple[str, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import ckpt.actions.restore as cold
    import ckpt.restore.warm as warm

    def broken(*args: object, **kwargs: object) -> None:
        raise RestoreError("simulated restore failure on the destination")

    for module in (cold, warm):  # the last step of a full and of a warm restore
        monkeypatch.setattr(module, "finish_process", broken)
    address, token = page_server
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 5)
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address, "--auth-token-file", token)
    message = assert_one_error_line(res)
    assert "simulated restore failure" in message, message
    assert proc.poll() is None and is_alive(proc.pid)
    assert_running_untraced(proc.pid)
    before = len(read_lines(out))
    wait_for_lines(out, before + 3)
    seq = numbers(out)
    assert [n for n, _ in seq] == list(range(1, len(seq) + 1))
    assert {p for _, p in seq} == {proc.pid}


def test_warm_restore_given_up_falls_back_to_full(harness: Harness, bins: Bins,
                                                  tmp_path: Path, page_server: tuple[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination cannot apply a round to its warm restore: it says so, and the
    final restore is a full one from the images; the process still goes on exactly."""
    import ckpt.restore.warm as warm

    def broken(*args: object, **kwargs: object) -> None:
        raise RestoreError("simulated warm restore failure")

    monkeypatch.setattr(warm.WarmRestore, "apply", broken)
    address, token = page_server
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 5)
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address, "--auth-token-file", token,
                   reap=proc)
    assert res.returncode == 0, res.describe()
    assert "simulated warm restore failure" in res.stdout and "(warm)" not in res.stdout
    new_pid = int(re.search(r"as pid (\d+)", res.stdout)[1])  # type: ignore[index]
    harness.track(new_pid)
    before = len(read_lines(out))
    wait_for_lines(out, before + 3)
    assert_running_untraced(new_pid)
    seq = numbers(out)
    assert [n for n, _ in seq] == list(range(1, len(seq) + 1)), "a gap or a repeat"


def test_source_side_killed_leaves_no_warm_process(harness: Harness, tmp_path: Path,
                                                   page_server: tuple[str, Path]) -> None:
    """ckpt migrate dies after the first round: the destination kills the process it was
    building for that connection, and the source runs on."""
    address, token = page_server
    out = tmp_path / "out.txt"
    proc = harness.launch([*py_target("bigmem.py"), "--mib", "64"], out)
    wait_for_lines(out, 2, timeout=30)
    before = our_children() - {proc.pid}
    migrate = subprocess.Popen([ckpt_command(), "migrate", "-t", str(proc.pid), "--to", address,
                                "--auth-token-file", str(token), "--max-rounds", "8"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        assert migrate.stdout is not None
        first = migrate.stdout.readline()
        assert first.startswith("round 1:"), first
        wait_for(lambda: our_children() - before - {proc.pid, migrate.pid} or None, 30,
                 "the warm restore's stub on the destination")
    finally:
        migrate.kill()
        migrate.communicate(timeout=30)  # nothing of ckpt's may outlive it (probe children)
    wait_for(lambda: not (our_children() - before - {proc.pid}) or None, 30,
             "the destination to kill its warm stub")
    assert_running_untraced(proc.pid)
    lines = wait_for_lines(out, len(read_lines(out)) + 2, timeout=30)
    iters = [int(x.split()[0].split("=")[1]) for x in lines]
    assert iters == list(range(iters[0], iters[0] + len(iters)))


def test_wrong_token_touches_nothing(harness: Harness, bins: Bins, tmp_path: Path,
                                    page_server: tuple[str, Path]) -> None:
    address, _ = page_server
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 3)
    message = assert_one_error_line(run_ckpt("migrate", "-t", str(proc.pid), "--to", address,
                                             "--auth-token-file", wrong))
    assert "token" in message
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())
    assert_running_untraced(proc.pid)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """Two network namespaces joined by a veth pair: (ns A, ns B, B's address)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    tag = f"ck{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    cmds = [
        ["ip", "netns", "add", a], ["ip", "netns", "add", b],
        ["ip", "link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb"],
        ["ip", "link", "set", f"{tag}va", "netns", a],
        ["ip", "link", "set", f"{tag}vb", "netns", b],
        ["ip", "-n", a, "addr", "add", "10.77.0.1/24", "dev", f"{tag}va"],
        ["ip", "-n", b, "addr", "add", "10.77.0.2/24", "dev", f"{tag}vb"],
        ["ip", "-n", a, "link", "set", f"{tag}va", "up"],
        ["ip", "-n", b, "link", "set", f"{tag}vb", "up"],
        ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"],
    ]
    try:
        for cmd in cmds:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot build the test network ({' '.join(cmd)}): "
                            f"{done.stderr.strip()}")
        yield a, b, "10.77.0.2"
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def page_server_in(harness: Harness, ns: str, address: str, tmp_path: Path,
                   token: Path) -> subprocess.Popen[bytes]:
    """A `ckpt page-server` in network namespace ``ns`` on HOST:PORT, writing into
    tmp_path/dest, once it listens."""
    host, port = address.rsplit(":", 1)
    log = tmp_path / "server.log"
    server = harness.launch(["ip", "netns", "exec", ns, ckpt_command(), "page-server",
                             "--address", host, "--port", port, "-D", tmp_path / "dest",
                             "--auth-token-file", token], log)
    wait_for_line(log, lambda s: "listening" in s, 20, f"the page server in {ns}")
    return server


@pytest.mark.parametrize("target", ["c", "python"])
def test_migrate_between_namespaces(harness: Harness, bins: Bins, tmp_path: Path,
                                    two_hosts: tuple[str, str, str], target: str) -> None:
    """Host A to host B over a veth link: the copy lives in B's network namespace."""
    a, b, b_addr = two_hosts
    token = tmp_path / "token"
    token.write_text("between-hosts\n")
    server = page_server_in(harness, b, f"{b_addr}:27077", tmp_path, token)
    out = tmp_path / "out.txt"
    in_a = ["ip", "netns", "exec", a]
    if target == "c":
        proc = harness.launch([*in_a, bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    else:
        proc = harness.launch([*in_a, *py_target("counter.py")], out)
    wait_for_lines(out, 5)
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", f"{b_addr}:27077",
                   "--auth-token-file", token, reap=proc, prefix=("ip", "netns", "exec", a))
    assert res.returncode == 0, res.describe()
    new_pid = int(re.search(r"as pid (\d+)", res.stdout)[1])  # type: ignore[index]
    harness.track(new_pid)
    before = len(read_lines(out))
    wait_for_lines(out, before + 3)
    assert_running_untraced(new_pid)
    assert os.stat(f"/proc/{new_pid}/ns/net").st_ino == os.stat(f"/run/netns/{b}").st_ino
    seq = numbers(out)
    assert [n for n, _ in seq] == list(range(1, len(seq) + 1)), "a gap or a repeat"
    harness.kill(server.pid)


def test_destination_killed_mid_transfer(harness: Harness, tmp_path: Path) -> None:
    """The page server dies during the first round: one error line, and the source runs
    on, untraced, still counting."""
    token = tmp_path / "token"
    token.write_text("t\n")
    log = tmp_path / "server.log"
    server = harness.launch([ckpt_command(), "page-server", "--address", "127.0.0.1",
                             "--port", "0", "-D", tmp_path / "dest", "--auth-token-file",
                             token], log)
    line = wait_for_line(log, lambda s: "listening" in s, 20, "the page server")
    out = tmp_path / "out.txt"
    proc = harness.launch([*py_target("bigmem.py"), "--mib", "64"], out)
    wait_for_lines(out, 2, timeout=30)
    migrate = subprocess.Popen([ckpt_command(), "migrate", "-t", str(proc.pid), "--to",
                                line.rsplit(" ", 1)[1], "--auth-token-file", str(token)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (tmp_path / "dest" / "1").exists() or None, 30, "the first round")
        harness.kill(server.pid)
        _, err = migrate.communicate(timeout=60)
    finally:
        if migrate.poll() is None:
            migrate.kill()
            migrate.wait()
    assert migrate.returncode != 0
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), err
    assert proc.poll() is None
    assert_running_untraced(proc.pid)
    before = len(read_lines(out))
    lines_now = wait_for_lines(out, before + 2, timeout=30)
    iters = [int(x.split()[0].split("=")[1]) for x in lines_now]
    assert iters == list(range(iters[0], iters[0] + len(iters)))


def test_compatibility_is_checked_before_copying(harness: Harness, bins: Bins,
                                                 tmp_path: Path,
                                                 page_server: tuple[str, Path]) -> None:
    """A destination lacking a file the process maps refuses before any round: one error
    line naming the file, nothing copied, the source untouched. The source runs from a
    tmpfs only its own mount namespace has (ckpt joins it there); the destination, in
    this one, lacks the executable. (A deleted executable is refused by the source.)"""
    address, token = page_server
    private = tmp_path / "private"
    private.mkdir()
    exe = private / "counter_copy"
    out = tmp_path / "out.txt"
    proc = harness.launch(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs ckpt-test {private} && cp {bins.counter_dyn} {exe} "
                           f"&& exec {exe} -o {out}"], tmp_path / "stdout.txt")
    wait_for_lines(out, 3)
    assert not exe.exists()
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address, "--auth-token-file", token,
                   prefix=("nsenter", "-t", str(proc.pid), "-m"))
    message = assert_one_error_line(res)
    assert str(exe) in message and "cannot run this process" in message, message
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())
    assert_running_untraced(proc.pid)


def test_incompatibility_reasons() -> None:
    from ckpt.images.pb import wire_pb2
    from ckpt.kernel.probe import probe
    from ckpt.transfer.server import incompatibility

    caps = probe()
    here = wire_pb2.CompatCheck(xstate_size=caps.xstate_size or 0, xcr0=caps.xcr0 or 0,
                                vdso_layout=caps.get("vdso-layout").detail,
                                files=["/bin/sh"])
    assert incompatibility(here) == ""
    other = wire_pb2.CompatCheck(xstate_size=(caps.xstate_size or 0) + 64)
    assert "XSTATE" in incompatibility(other)
    assert "vdso" in incompatibility(wire_pb2.CompatCheck(vdso_layout="vdso 9p"))
    assert "/no/such" in incompatibility(wire_pb2.CompatCheck(files=["/no/such"]))


def test_non_converging_target_still_migrates(harness: Harness, tmp_path: Path,
                                             page_server: tuple[str, Path]) -> None:
    """A target rewriting all its memory all the time never converges: migration stops
    iterating (and says why), does a final round, and the process goes on."""
    address, token = page_server
    out = tmp_path / "out.txt"
    proc = harness.launch(py_target("dirtier.py"), out)
    wait_for_lines(out, 2, timeout=30)
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address, "--auth-token-file", token,
                   "--max-rounds", "4", "--max-downtime-ms", "1", "--json", reap=proc)
    assert res.returncode == 0, res.describe()
    summary = json.loads(res.stdout)
    new_pid = summary["pid"]
    harness.track(new_pid)
    assert "stopped shrinking" in summary["stop_reason"], summary
    assert summary["rounds"] <= 5
    proc.wait(timeout=10)
    before = len(read_lines(out))
    wait_for_lines(out, before + 2, timeout=30)
    assert_running_untraced(new_pid)
    seq = numbers(out)
    assert [n for n, _ in seq] == list(range(1, len(seq) + 1)), "a gap or a repeat"


def test_auto_converge_throttles_and_completes(harness: Harness, tmp_path: Path,
                                               page_server: tuple[str, Path]) -> None:
    """--auto-converge: rounds that do not shrink the dirty set throttle the target (the
    round lines say so); it completes and nothing is left stopped."""
    address, token = page_server
    out = tmp_path / "out.txt"
    proc = harness.launch(py_target("dirtier.py"), out)
    wait_for_lines(out, 2, timeout=30)
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address, "--auth-token-file", token,
                   # The dirtier's 32 MiB do not compress: no round's estimate fits 1 ms.
                   "--max-rounds", "6", "--max-downtime-ms", "1", "--auto-converge", reap=proc)
    assert res.returncode == 0, res.describe()
    new_pid = int(re.search(r"as pid (\d+)", res.stdout)[1])  # type: ignore[index]
    harness.track(new_pid)
    assert "throttled to" in res.stdout, res.stdout
    proc.wait(timeout=10)
    before = len(read_lines(out))
    wait_for_lines(out, before + 2, timeout=30)
    assert_running_untraced(new_pid)
    seq = numbers(out)
    assert [n for n, _ in seq] == list(range(1, len(seq) + 1)), "a gap or a repeat"


def test_plot_of_the_rounds(harness: Harness, bins: Bins, tmp_path: Path,
                            page_server: tuple[str, Path]) -> None:
    pytest.importorskip("matplotlib")
    address, token = page_server
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 3)
    png = tmp_path / "rounds.png"
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address, "--auth-token-file", token,
                   "--plot", png, reap=proc)
    assert res.returncode == 0, res.describe()
    harness.track(int(re.search(r"as pid (\d+)", res.stdout)[1]))  # type: ignore[index]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the hand-over


def state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


def restored_uncommitted(harness: Harness, bins: Bins, tmp_path: Path, address: str,
                         stopped: bool = False) -> tuple[subprocess.Popen[bytes], Path, int]:
    """A counter (``stopped``: in a job-control stop) dumped (left running), sent and
    restored on the page server, then the link closed before any Commit: (source, its
    output file, the restored pid)."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 3)
    if stopped:
        stop(proc)
    images = tmp_path / "images"
    res = run_ckpt("dump", "-t", str(proc.pid), "-D", images, "--leave-running")
    assert res.returncode == 0, res.describe()
    host, port = address.rsplit(":", 1)
    with connect(host, int(port), b"migrate-me") as conn:
        send_pass_on(conn, images, "1")
        pid = restore_remote(conn, "1").pid
    harness.track(pid)
    return proc, out, pid


def test_commit_after_the_link_broke(harness: Harness, bins: Bins, tmp_path: Path,
                                     page_server: tuple[str, Path]) -> None:
    """The link breaks between RestoreDone and Commit: the copy stays stopped, and a
    Commit naming its pid on a new connection lets it run (once)."""
    address, _ = page_server
    source, out, pid = restored_uncommitted(harness, bins, tmp_path, address)
    time.sleep(0.5)
    assert state(pid) == "T", "an uncommitted copy must not run"
    harness.kill(source.pid)
    host, port = address.rsplit(":", 1)
    with connect(host, int(port), b"migrate-me") as conn:
        commit_remote(conn, pid)
    wait_for(lambda: any(p == pid for _, p in numbers(out)) or None, 20,
             f"output from the committed pid {pid}")
    assert_running_untraced(pid)
    with connect(host, int(port), b"migrate-me") as conn, \
            pytest.raises(TransferError, match=f"no restored process {pid}"):
        commit_remote(conn, pid)


def test_commit_after_the_link_broke_leaves_a_stopped_copy_stopped(
        harness: Harness, bins: Bins, tmp_path: Path, page_server: tuple[str, Path]) -> None:
    address, _ = page_server
    source, out, pid = restored_uncommitted(harness, bins, tmp_path, address, stopped=True)
    harness.kill(source.pid)
    at_commit = len(read_lines(out))
    host, port = address.rsplit(":", 1)
    with connect(host, int(port), b"migrate-me") as conn:
        commit_remote(conn, pid)
    time.sleep(0.5)  # a copy let run would have written by now
    assert all_stopped(pid) and len(read_lines(out)) == at_commit, proc_status(pid)
    os.kill(pid, signal.SIGCONT)
    wait_for(lambda: any(p == pid for _, p in numbers(out)) or None, 20,
             f"output from the committed pid {pid}")


def test_uncommitted_copy_dies_after_the_grace_period(harness: Harness, bins: Bins,
                                                      tmp_path: Path) -> None:
    """Nobody commits: the stopped copy is killed when the grace period ends, and the
    source runs on."""
    port = start_server(tmp_path / "dest", commit_grace=1.0)
    source, out, pid = restored_uncommitted(harness, bins, tmp_path, f"127.0.0.1:{port}")
    assert state(pid) == "T"
    wait_for(lambda: not is_alive(pid) or None, 20, f"the uncommitted copy {pid} to die")
    assert_running_untraced(source.pid)
    assert {p for _, p in numbers(out)} == {source.pid}


def test_stopped_target_arrives_stopped(harness: Harness, bins: Bins, tmp_path: Path,
                                        page_server: tuple[str, Path]) -> None:
    """A target in a job-control stop migrates and stays stopped there (the commit does
    not SIGCONT it, nor does an --auto-converge throttle); a SIGCONT then lets it go on
    without a gap."""
    address, token = page_server
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 3)
    stop(proc)
    at_stop = len(read_lines(out))
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address, "--auth-token-file", token,
                   "--auto-converge", reap=proc)
    assert res.returncode == 0, res.describe()
    new_pid = int(re.search(r"as pid (\d+)", res.stdout)[1])  # type: ignore[index]
    harness.track(new_pid)
    proc.wait(timeout=10)
    assert all_stopped(new_pid), proc_status(new_pid)
    time.sleep(0.5)  # a copy let run would have written by now
    assert all_stopped(new_pid) and len(read_lines(out)) == at_stop
    os.kill(new_pid, signal.SIGCONT)
    wait_for_lines(out, at_stop + 3)
    assert_running_untraced(new_pid)
    seq = numbers(out)
    assert [n for n, _ in seq] == list(range(1, len(seq) + 1)), "a gap or a repeat"
    assert {p for _, p in seq} == {proc.pid, new_pid}


def test_throttle_leaves_a_stopped_target_stopped(harness: Harness, bins: Bins,
                                                  tmp_path: Path) -> None:
    """The throttle's closing SIGCONT must not undo a stop the target's user made."""
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 2)
    stop(proc)
    with Throttle(proc.pid, 0.6) as throttle:
        time.sleep(3 * Throttle.PERIOD)
    assert throttle.duty == 0.0
    assert all_stopped(proc.pid), proc_status(proc.pid)
    os.kill(proc.pid, signal.SIGCONT)
    with Throttle(proc.pid, 0.6) as throttle:  # a running one is throttled, then resumed
        time.sleep(3 * Throttle.PERIOD)
    assert throttle.duty == 0.6
    assert_running_untraced(proc.pid)


# --------------------------------------------------------------------------- TLS, tokens


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """An in-process page server speaking TLS: (HOST:PORT, token file, its certificate)."""
    cert, key = make_cert(tmp_path / "server-cert", "server")
    token = tmp_path / "token"
    token.write_text("migrate-me\n")
    port = start_server(tmp_path / "dest", tls=server_tls_context(cert, key))
    yield f"127.0.0.1:{port}", token, cert


def test_migrate_over_tls(harness: Harness, bins: Bins, tmp_path: Path,
                          tls_server: tuple[str, Path, Path]) -> None:
    address, token, cert = tls_server
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 5)
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address, "--auth-token-file", token,
                   "--tls-cacert", cert, reap=proc)
    assert res.returncode == 0, res.describe()
    new_pid = int(re.search(r"as pid (\d+)", res.stdout)[1])  # type: ignore[index]
    harness.track(new_pid)
    wait_for_lines(out, len(read_lines(out)) + 3)
    seq = numbers(out)
    assert [n for n, _ in seq] == list(range(1, len(seq) + 1)), "a gap or a repeat"


@pytest.mark.parametrize("how", ["plain", "other-ca", "no-token"])
def test_tls_or_token_mismatch_touches_nothing(harness: Harness, bins: Bins, tmp_path: Path,
                                               tls_server: tuple[str, Path, Path],
                                               how: str) -> None:
    """No TLS against a TLS server, a server certificate from another CA, no token: one
    error line, nothing stored, the source runs on untraced."""
    address, token, _ = tls_server
    other, _ = make_cert(tmp_path / "other-cert", "other")
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 3)
    table: dict[str, list[str | Path]] = {
        "plain": ["--auth-token-file", token],
        "other-ca": ["--auth-token-file", token, "--tls-cacert", other],
        "no-token": []}
    args = table[how]
    assert_one_error_line(run_ckpt("migrate", "-t", str(proc.pid), "--to", address, *args))
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())
    assert_running_untraced(proc.pid)
    before = len(read_lines(out))
    wait_for_lines(out, before + 2)
    assert {p for _, p in numbers(out)} == {proc.pid}


def test_commit_of_a_copy_that_died_is_refused(harness: Harness, bins: Bins, tmp_path: Path,
                                               page_server: tuple[str, Path]) -> None:
    """The parked copy dies before the source commits it: the commit is refused with the
    reason (it used to stop the whole server), and the server goes on."""
    address, _ = page_server
    source, _, pid = restored_uncommitted(harness, bins, tmp_path, address)
    harness.kill(pid)
    host, port = address.rsplit(":", 1)
    with connect(host, int(port), b"migrate-me") as conn, \
            pytest.raises(TransferError, match=f"restored process {pid} died before the commit"):
        commit_remote(conn, pid)
    with connect(host, int(port), b"migrate-me") as conn, \
            pytest.raises(TransferError, match=f"no restored process {pid}"):
        commit_remote(conn, pid)
    assert_running_untraced(source.pid)
