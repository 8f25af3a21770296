"""The page server serves many clients at once and no client can stall it: idle and
trickling connections are dropped at the handshake deadline, the connection bounds refuse
politely (and the client asks again), one connection's failure is logged and the server
goes on, and two connections never write one pass directory together."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ckpt_command, wait_for_line
from test_transfer import HOST, TOKEN, all_files, expect_refusal, raw_client

from ckpt.images.pb import wire_pb2
from ckpt.transfer import TransferError, pass_name, send_pass, serve
from ckpt.transfer import server as server_module
from ckpt.transfer.listener import Limits, admission
from ckpt.transfer.wire import BUSY, Conn, MsgType, client_handshake

PROMPT = 20.0  # generous: a stalled server made clients wait 90 s and more
IMAGES = ["core-7.img", "inventory.img", "pagemap-7.img", "pages-7.img"]


def start(root: Path, limits: Limits | None = None) -> int:
    """serve() for any number of connections, on a thread; returns its port."""
    ready = threading.Event()
    port: list[int] = []

    def started(p: int) -> None:
        port.append(p)
        ready.set()

    threading.Thread(target=serve, args=(HOST, 0, root, TOKEN),
                     kwargs={"ready": started, "limits": limits}, daemon=True).start()
    assert ready.wait(10), "page server did not start"
    return port[0]


def small_pass(d: Path) -> Path:
    d.mkdir(parents=True)
    for name in IMAGES:
        (d / name).write_bytes(os.urandom(3000))
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "server-images"
    d.mkdir()
    return d


def idle(port: int, source: str = HOST) -> socket.socket:
    """A TCP connection that never says anything."""
    return socket.create_connection((HOST, port), timeout=PROMPT, source_address=(source, 0))


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server hangs up this connection within PROMPT seconds."""
    sock.settimeout(PROMPT)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def hello_frame() -> bytes:
    """A complete, valid Hello frame (what a client sends first)."""
    header = bytes([MsgType.HELLO]) + wire_pb2.Hello(
        protocol_version=1, client_nonce=b"n" * 32, role=wire_pb2.ROLE_SEND).SerializeToString()
    return len(header).to_bytes(4, "little") + bytes(4) + header


class SlowLoris:
    """Trickles a Hello one byte a second; records whether the server hung up first."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=PROMPT)
        self.dropped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for byte in hello_frame():
                self.sock.send(bytes([byte]))
                time.sleep(1.0)
            if not self.sock.recv(4096):
                self.dropped.set()
        except OSError:
            self.dropped.set()
        finally:
            self.sock.close()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


# -- pure decisions ---------------------------------------------------------------------------


def test_admission() -> None:
    limits = Limits(max_connections=4, max_per_peer=2)
    assert admission(0, 0, limits) == ""
    assert admission(3, 1, limits) == ""
    assert admission(4, 0, limits).startswith(f"{BUSY}: 4 connections open (at most 4)")
    assert "2 connections open from your host (at most 2)" in admission(2, 2, limits)


@pytest.mark.parametrize("images_dir,name", [("ck/1", "1"), ("ck/2/", "2"), ("/a/b/pre.3", "pre.3"),
                                             ("x", "x"), ("ck/1/../2", "2")])
def test_pass_name_of_a_directory(images_dir: str, name: str) -> None:
    assert pass_name(images_dir) == name


@pytest.mark.parametrize("images_dir", ["ck/a b", ".", "/", "ck/.hidden", "ck/été"])
def test_pass_name_the_server_would_refuse(images_dir: str) -> None:
    with pytest.raises(TransferError, match="is not one it accepts"):
        pass_name(images_dir)


# -- nobody stalls the server -----------------------------------------------------------------


def test_idle_connections_neither_delay_clients_nor_stay(root: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture,
                                                         ) -> None:
    caplog.set_level(logging.INFO, "ckpt.transfer")
    port = start(root)
    idlers = [idle(port) for _ in range(3)]
    local = small_pass(tmp_path / "local" / "1")
    assert timed(lambda: send_pass(HOST, port, TOKEN, local, "1")) < PROMPT
    assert all_files(root / "1") == IMAGES
    for sock in idlers:
        assert closed_by_server(sock), "an idle connection outlived the handshake deadline"
        sock.close()
    def dropped_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if "not authenticated within 5 s" in r.getMessage()]

    # the server logs a drop just after it closed the socket: wait for the third line
    deadline = time.monotonic() + PROMPT
    while len(dropped_lines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    dropped = dropped_lines()
    assert len(dropped) == 3, [r.getMessage() for r in caplog.records]
    assert all(f"{HOST}:" in line for line in dropped)


def test_slow_loris_is_dropped_at_the_handshake_deadline(root: Path, tmp_path: Path) -> None:
    port = start(root, Limits(handshake_timeout=2.0))
    loris = SlowLoris(port)
    local = small_pass(tmp_path / "local" / "1")
    assert timed(lambda: send_pass(HOST, port, TOKEN, local, "1")) < PROMPT
    assert loris.dropped.wait(PROMPT), "a trickling client was not dropped"
    loris.thread.join(PROMPT)


def test_fifty_parallel_clients(root: Path, tmp_path: Path) -> None:
    """50 clients at once, among idle and trickling connections, from one host (over the
    per-host bound: the refused ones ask again): every pass arrives whole, promptly, and
    the server goes on serving."""
    port = start(root)
    idlers = [idle(port) for _ in range(3)]
    loris = SlowLoris(port)
    results: dict[int, float | BaseException] = {}

    def client(k: int) -> None:
        try:
            local = small_pass(tmp_path / "local" / str(k) / f"p{k}")
            results[k] = timed(lambda: send_pass(HOST, port, TOKEN, local, f"p{k}"))
        except BaseException as exc:
            results[k] = exc

    threads = [threading.Thread(target=client, args=(k,)) for k in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    failed = {k: r for k, r in results.items() if not isinstance(r, float)}
    assert len(results) == 50 and not failed, failed
    assert max(r for r in results.values() if isinstance(r, float)) < PROMPT
    for k in range(50):
        for name in IMAGES:
            sent = tmp_path / "local" / str(k) / f"p{k}" / name
            assert (root / f"p{k}" / name).read_bytes() == sent.read_bytes()
    assert loris.dropped.wait(PROMPT)
    for sock in idlers:
        assert closed_by_server(sock)
        sock.close()
    local = small_pass(tmp_path / "local" / "after" / "after")
    send_pass(HOST, port, TOKEN, local, "after")
    assert all_files(root / "after") == IMAGES


# -- bounds -----------------------------------------------------------------------------------


def test_bounds_refuse_politely_and_the_client_asks_again(root: Path, tmp_path: Path) -> None:
    """Over the per-host bound (2) and the total bound (3, reached from another loopback
    address) a client is told the server is busy; send_pass gets in once an idle
    connection reaches its handshake deadline."""
    port = start(root, Limits(handshake_timeout=3.0, max_connections=3, max_per_peer=2))
    idlers = [idle(port), idle(port)]  # accepted first: the backlog is first in, first out
    with Conn(idle(port), "third") as conn, pytest.raises(TransferError, match=(
            r"refused: page server busy: 2 connections open from your host \(at most 2\)")):
        client_handshake(conn, TOKEN)
    other = idle(port, source="127.0.0.2")
    with Conn(idle(port, source="127.0.0.3"), "fourth") as conn, pytest.raises(
            TransferError, match=r"refused: page server busy: 3 connections open \(at most 3\)"):
        client_handshake(conn, TOKEN)
    local = small_pass(tmp_path / "local" / "1")
    assert timed(lambda: send_pass(HOST, port, TOKEN, local, "1")) < PROMPT
    assert all_files(root / "1") == IMAGES
    for sock in [*idlers, other]:
        sock.close()


# -- one connection's failure -----------------------------------------------------------------


def test_an_internal_error_in_one_connection_is_logged_and_the_server_goes_on(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ckpt.transfer")

    def broken(req: wire_pb2.CompatCheck) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server_module, "incompatibility", broken)
    port = start(root)
    with raw_client(port) as conn:
        conn.send(wire_pb2.CompatCheck())
        with pytest.raises(TransferError, match="closed"):
            conn.recv()
        host, port_ = conn.sock.getsockname()[:2]
        me = f"{host}:{port_}"
    local = small_pass(tmp_path / "local" / "1")
    send_pass(HOST, port, TOKEN, local, "1")
    assert all_files(root / "1") == IMAGES
    assert f"page server: {me}: internal error: RuntimeError: a bug" in caplog.messages


# -- shared state -----------------------------------------------------------------------------


def test_one_pass_directory_one_writer(root: Path, tmp_path: Path) -> None:
    """A second connection sending a pass another is still receiving is refused; the
    first completes untouched."""
    port = start(root)
    data = os.urandom(5000)
    with raw_client(port) as first:
        first.send(wire_pb2.PassStart(name="1"))
        first.send(wire_pb2.FileStart(name="core-1.img", size=len(data), mode=0o600))
        first.send_data(data[:100])
        with raw_client(port) as second:
            second.send(wire_pb2.PassStart(name="1"))
            assert "pass 1 is in use by another connection" in expect_refusal(second)
        local = small_pass(tmp_path / "local" / "1")
        with pytest.raises(TransferError, match="pass 1 is in use by another connection"):
            send_pass(HOST, port, TOKEN, local, "1")
        first.send_data(data[100:])
        first.send(wire_pb2.FileEnd(crc32=zlib.crc32(data)))
        first.send(wire_pb2.PassEnd(name="1"))
        ack = first.expect(wire_pb2.Ack)
        assert ack.ok, ack.error
    assert (root / "1" / "core-1.img").read_bytes() == data
    assert all_files(root / "1") == ["core-1.img"]
    # once the first connection is gone, the name is free again
    send_pass(HOST, port, TOKEN, local, "1")
    assert all_files(root / "1") == IMAGES


# -- the command ------------------------------------------------------------------------------


def test_page_server_command_logs_to_its_log_file(tmp_path: Path) -> None:
    """`ckpt page-server -o FILE` logs there at info level: connections, and why one was
    dropped, naming the peer."""
    token = tmp_path / "token"
    token.write_bytes(TOKEN)
    log = tmp_path / "server.log"
    err = tmp_path / "stderr"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen([ckpt_command(), "page-server", "--address", HOST, "--port", "0",
                                 "-D", str(tmp_path / "store"), "--auth-token-file", str(token),
                                 "--handshake-timeout", "1", "-o", str(log)],
                                stdin=subprocess.DEVNULL, stderr=stderr)
    try:
        line = wait_for_line(err, lambda s: "listening on" in s, PROMPT, "the page server")
        with idle(int(line.rsplit(":", 1)[1])) as sock:
            peer = "{}:{}".format(*sock.getsockname()[:2])
            assert closed_by_server(sock)
        wait_for_line(log, lambda s: f"page server: {peer}: not authenticated within 1 s" in s,
                      PROMPT, "the dropped connection in the log")
        assert f"INFO page server: {peer} connected" in log.read_text()
    finally:
        proc.kill()
        proc.wait()
