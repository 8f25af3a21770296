"""CRIU's page-server use: predump and dump passes sent to `ckpt page-server`, restored
from the server's directory; a wrong token writes nothing there."""

from __future__ import annotations

import functools
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Bins,
    Harness,
    assert_one_error_line,
    assert_running_untraced,
    check_counter_file,
    ckpt_command,
    fd_links,
    needs_root,
    read_lines,
    run_ckpt,
    wait_for,
    wait_for_line,
    wait_for_lines,
)

pytestmark = needs_root


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, str, Path]]:
    """A page server on a free loopback port: (its images dir, HOST:PORT, token file)."""
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    store = tmp_path / "server"
    log = tmp_path / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([ckpt_command(), "page-server", "--address", "127.0.0.1",
                                 "--port", "0", "-D", str(store), "--auth-token-file",
                                 str(token)], stdin=subprocess.DEVNULL, stderr=err)
    try:
        line = wait_for_line(log, lambda s: "listening on" in s, 20, "the page server")
        yield store, line.rsplit(" ", 1)[1], token
    finally:
        proc.kill()
        proc.wait()


def test_passes_restore_from_the_page_server(harness: Harness, bins: Bins, tmp_path: Path,
                                             server: tuple[Path, str, Path]) -> None:
    store, address, token = server
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 5)
    ck = tmp_path / "ck"
    remote = ("--page-server", address, "--auth-token-file", str(token))
    res = run_ckpt("predump", "-t", str(proc.pid), "-D", ck / "1", *remote)
    assert res.returncode == 0, res.describe()
    time.sleep(0.3)
    res = run_ckpt("dump", "-t", str(proc.pid), "-D", ck / "2", "--incremental",
                   "--prev-images-dir", "../1", *remote, reap=proc)
    assert res.returncode == 0, res.describe()
    proc.wait(timeout=10)
    assert sorted(p.name for p in store.iterdir()) == ["1", "2"]

    at_dump = len(read_lines(out))
    assert harness.restore_detached(store / "2") == proc.pid
    wait_for_lines(out, at_dump + 5)
    assert_running_untraced(proc.pid)
    assert check_counter_file(out) == [proc.pid] * len(read_lines(out))


def test_wrong_token_is_refused(harness: Harness, bins: Bins, tmp_path: Path,
                                server: tuple[Path, str, Path]) -> None:
    store, address, _ = server
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 3)
    res = run_ckpt("predump", "-t", str(proc.pid), "-D", tmp_path / "ck" / "1",
                   "--page-server", address, "--auth-token-file", str(wrong))
    message = assert_one_error_line(res)
    assert "token" in message, message
    assert not store.exists() or not any(store.iterdir())
    assert_running_untraced(proc.pid)


PROMPT = 20.0  # generous: behind idle connections a pass waited 90 s, or failed


def test_predump_behind_idle_connections(harness: Harness, bins: Bins, tmp_path: Path,
                                         server: tuple[Path, str, Path]) -> None:
    """Idle connections neither delay a `predump --page-server` nor stay: the server drops
    each at its handshake deadline and logs that, naming the peer."""
    store, address, token = server
    host, port = address.rsplit(":", 1)
    idlers = [socket.create_connection((host, int(port))) for _ in range(3)]
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 3)
    t0 = time.monotonic()
    res = run_ckpt("predump", "-t", str(proc.pid), "-D", tmp_path / "ck" / "1",
                   "--page-server", address, "--auth-token-file", str(token))
    assert res.returncode == 0, res.describe()
    assert time.monotonic() - t0 < PROMPT
    assert (store / "1" / "inventory.img").is_file()
    assert_running_untraced(proc.pid)
    log = tmp_path / "server.log"
    for sock in idlers:
        want = "page server: {}:{}: not authenticated within 5 s".format(*sock.getsockname()[:2])
        wait_for(functools.partial(logged, log, want), PROMPT, want)
        sock.close()


def logged(log: Path, text: str) -> bool | None:
    return any(text in line for line in read_lines(log)) or None


@pytest.mark.parametrize("command", ["predump", "dump"])
def test_pass_name_the_server_refuses_touches_nothing(
        harness: Harness, bins: Bins, tmp_path: Path, server: tuple[Path, str, Path],
        command: str) -> None:
    """The server stores a pass under the name of its -D directory: a name it would refuse
    is refused before the target is touched (no userfaultfd injected, no images, and a dump
    does not kill it)."""
    store, address, token = server
    out = tmp_path / "out.txt"
    proc = harness.launch([bins.counter_dyn, "-o", out], tmp_path / "stdout.txt")
    wait_for_lines(out, 3)
    images = tmp_path / "ck" / "a b"
    res = run_ckpt(command, "-t", str(proc.pid), "-D", images, "--page-server", address,
                   "--auth-token-file", str(token), reap=proc)
    message = assert_one_error_line(res)
    assert "'a b'" in message and "not one it accepts" in message, message
    assert not images.exists()
    assert not store.exists() or not any(store.iterdir())
    assert_running_untraced(proc.pid)
    assert not [fd for fd, link in fd_links(proc.pid).items() if "userfaultfd" in link]
