"""Page server and client (ckpt.transfer) on loopback: round trip, authentication, version,
dropped connections, path traversal and TLS."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.images.pb import wire_pb2
from ckpt.transfer import (
    TransferError,
    client_tls_context,
    load_token,
    send_pass,
    serve,
    server_tls_context,
)
from ckpt.transfer.wire import MAX_CHUNK, Conn, client_handshake

TOKEN = b"s3cret-token-for-tests"
HOST = "127.0.0.1"


class Server:
    """serve(once=True) in a thread; join() waits for its one connection to end."""

    def __init__(self, root: Path, token: bytes = TOKEN, tls: ssl.SSLContext | None = None):
        self.root = root
        self.errors: list[BaseException] = []
        got_port = threading.Event()
        self.port = 0

        def ready(port: int) -> None:
            self.port = port
            got_port.set()

        def run() -> None:
            try:
                serve(HOST, 0, root, token, tls=tls, once=True, ready=ready)
            except BaseException as exc:  # reported by join()
                self.errors.append(exc)
                got_port.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert got_port.wait(10), "server did not start"
        assert not self.errors, self.errors

    def join(self) -> None:
        self.thread.join(20)
        assert not self.thread.is_alive(), "server did not return after its connection"
        assert not self.errors, self.errors


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "server-images"
    d.mkdir()
    return d


@pytest.fixture
def local(tmp_path: Path) -> Path:
    """A fake images dir: random bytes, one 20 MiB file, a temp file and a non-image."""
    d = tmp_path / "local" / "1"
    d.mkdir(parents=True)
    (d / "inventory.img").write_bytes(os.urandom(200))
    (d / "core-4242.img").write_bytes(os.urandom(5000))
    (d / "pagemap-4242.img").write_bytes(b"")
    (d / "pages-4242.img").write_bytes(os.urandom(20 << 20) + b"tail")
    (d / ".pages-4243.img.tmp").write_bytes(b"half written")
    (d / "notes.txt").write_bytes(b"not an image")
    return d


def all_files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def raw_client(port: int, token: bytes = TOKEN) -> Conn:
    """An authenticated connection speaking the protocol by hand."""
    conn = Conn(socket.create_connection((HOST, port), timeout=10), f"{HOST}:{port}")
    client_handshake(conn, token)
    return conn


def expect_refusal(conn: Conn) -> str:
    frame = conn.recv()
    assert frame is not None
    assert isinstance(frame.msg, wire_pb2.Ack), frame
    assert not frame.msg.ok
    return frame.msg.error


# -- round trip -----------------------------------------------------------------------------


def test_pass_round_trip_is_byte_identical(root: Path, local: Path) -> None:
    server = Server(root)
    sent = send_pass(HOST, server.port, TOKEN, local, "1")
    server.join()
    images = ["core-4242.img", "inventory.img", "pagemap-4242.img", "pages-4242.img"]
    assert all_files(root) == ["1", *(f"1/{n}" for n in images)]
    for name in images:
        assert (root / "1" / name).read_bytes() == (local / name).read_bytes(), name
        assert (root / "1" / name).stat().st_mode & 0o077 == 0
    assert sent.files == 4
    assert sent.bytes == sum((local / n).stat().st_size for n in images)


def test_several_passes_and_resend_replace(root: Path, local: Path) -> None:
    for name, payload in (("1", b"first"), ("2", b"second"), ("1", b"again")):
        (local / "core-4242.img").write_bytes(payload)
        server = Server(root)
        send_pass(HOST, server.port, TOKEN.decode(), local, name)
        server.join()
        assert (root / name / "core-4242.img").read_bytes() == payload
    assert all_files(root).count("2/pages-4242.img") == 1
    assert not [p for p in all_files(root) if Path(p).name.startswith(".")]
    # another process's pass under a name already used leaves none of the old files
    for old in local.glob("*-4242.img"):
        old.rename(local / old.name.replace("4242", "5151"))
    server = Server(root)
    send_pass(HOST, server.port, TOKEN, local, "1")
    server.join()
    assert sorted(p.name for p in (root / "1").iterdir()) == [
        "core-5151.img", "inventory.img", "pagemap-5151.img", "pages-5151.img"]


def test_incomplete_local_pass_is_not_sent(root: Path, local: Path) -> None:
    (local / "inventory.img").unlink()
    with pytest.raises(TransferError, match=r"inventory\.img missing"):
        send_pass(HOST, 1, TOKEN, local, "1")


# -- authentication ----------------------------------------------------------------------


def test_wrong_token_is_refused_and_nothing_written(root: Path, local: Path) -> None:
    server = Server(root)
    with pytest.raises(TransferError, match=r"^authentication failed: .*wrong token$"):
        send_pass(HOST, server.port, b"not-the-token", local, "1")
    server.join()
    assert all_files(root) == []


def test_client_refuses_a_server_without_the_token(local: Path) -> None:
    """Mutual authentication: a fake server that accepts any client is caught."""
    listener = socket.create_server((HOST, 0))
    port = listener.getsockname()[1]
    after_auth: list[object] = []

    def fake_server() -> None:
        sock, _ = listener.accept()
        with Conn(sock, "client") as conn:
            conn.expect(wire_pb2.Hello)
            conn.send(wire_pb2.Challenge(server_nonce=os.urandom(32), protocol_version=1))
            conn.expect(wire_pb2.Auth)
            conn.send(wire_pb2.AuthOk(mac=os.urandom(32)))
            after_auth.append(conn.recv(eof_ok=True))

    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    with listener, pytest.raises(TransferError, match="does not hold the same token"):
        send_pass(HOST, port, TOKEN, local, "1")
    t.join(10)
    assert after_auth == [None], "the client sent data to an unauthenticated server"


def test_token_file(tmp_path: Path, root: Path, local: Path) -> None:
    with pytest.raises(TransferError, match=r"cannot read auth token file .*No such file"):
        load_token(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_bytes(b" \n")
    with pytest.raises(TransferError, match=r"auth token file .* is empty"):
        load_token(empty)
    good = tmp_path / "token"
    good.write_bytes(TOKEN + b"\n")
    assert load_token(good) == TOKEN
    with pytest.raises(TransferError, match="empty authentication token"):
        serve(HOST, 0, root, b"", once=True)
    with pytest.raises(TransferError, match="empty authentication token"):
        send_pass(HOST, 1, "", local, "1")


# -- protocol version ----------------------------------------------------------------------


def test_other_protocol_version_is_refused(root: Path) -> None:
    server = Server(root)
    with Conn(socket.create_connection((HOST, server.port), timeout=10), "server") as conn:
        conn.send(wire_pb2.Hello(protocol_version=99, client_nonce=os.urandom(32),
                                    role=wire_pb2.ROLE_SEND))
        error = expect_refusal(conn)
    server.join()
    assert "protocol version 99 not supported" in error
    assert "version 1" in error
    assert all_files(root) == []


def test_client_refuses_a_server_of_another_version(local: Path) -> None:
    listener = socket.create_server((HOST, 0))
    port = listener.getsockname()[1]

    def fake_server() -> None:
        sock, _ = listener.accept()
        with Conn(sock, "client") as conn:
            conn.expect(wire_pb2.Hello)
            conn.send(wire_pb2.Challenge(server_nonce=os.urandom(32), protocol_version=2))
            conn.recv(eof_ok=True)

    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    with listener, pytest.raises(TransferError, match="speaks protocol version 2, this ckpt"):
        send_pass(HOST, port, TOKEN, local, "1")
    t.join(10)


def test_garbage_is_refused(root: Path) -> None:
    server = Server(root)
    # The server may hang up (even reset) at any point here: that is the refusal.
    with socket.create_connection((HOST, server.port), timeout=10) as sock, \
            contextlib.suppress(OSError):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
    server.join()
    assert all_files(root) == []


# -- partial and corrupted files -------------------------------------------------------------


def test_connection_dropped_mid_file_leaves_no_file(root: Path) -> None:
    server = Server(root)
    conn = raw_client(server.port)
    conn.send(wire_pb2.PassStart(name="1"))
    whole = b"complete file"
    conn.send(wire_pb2.FileStart(name="core-1.img", size=len(whole), mode=0o600))
    conn.send_data(whole)
    conn.send(wire_pb2.FileEnd(crc32=zlib.crc32(whole)))
    conn.send(wire_pb2.FileStart(name="pages-1.img", size=10 << 20, mode=0o600))
    for _ in range(3):
        conn.send_data(os.urandom(MAX_CHUNK))
    conn.close()
    server.join()
    assert all_files(root) == ["1", "1/core-1.img"]
    assert (root / "1" / "core-1.img").read_bytes() == whole


def test_crc_mismatch_is_refused(root: Path) -> None:
    server = Server(root)
    with raw_client(server.port) as conn:
        conn.send(wire_pb2.PassStart(name="1"))
        data = os.urandom(3000)
        conn.send(wire_pb2.FileStart(name="core-1.img", size=len(data), mode=0o600))
        conn.send_data(data)
        conn.send(wire_pb2.FileEnd(crc32=zlib.crc32(data) ^ 1))
        assert "CRC mismatch" in expect_refusal(conn)
    server.join()
    assert all_files(root) == ["1"]


def test_more_data_than_announced_is_refused(root: Path) -> None:
    server = Server(root)
    with raw_client(server.port) as conn:
        conn.send(wire_pb2.PassStart(name="1"))
        conn.send(wire_pb2.FileStart(name="core-1.img", size=10, mode=0o600))
        conn.send_data(b"x" * 11)
        assert "more data than the 10 bytes announced" in expect_refusal(conn)
    server.join()
    assert all_files(root) == ["1"]


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil.img", "a/b.img", "/etc/evil.img", "..", ".x.tmp", ""])
def test_bad_file_names_are_refused(root: Path, name: str) -> None:
    server = Server(root)
    with raw_client(server.port) as conn:
        conn.send(wire_pb2.PassStart(name="1"))
        conn.send(wire_pb2.FileStart(name=name, size=4, mode=0o600))
        conn.send_data(b"evil")
        conn.send(wire_pb2.FileEnd(crc32=zlib.crc32(b"evil")))
        assert "invalid file name" in expect_refusal(conn)
    server.join()
    assert all_files(root) == ["1"]
    assert not (root / "evil.img").exists()


@pytest.mark.parametrize("name", ["../1", "..", "a/b", ".", "/tmp"])
def test_bad_pass_names_are_refused(root: Path, local: Path, name: str) -> None:
    server = Server(root)
    with raw_client(server.port) as conn:
        conn.send(wire_pb2.PassStart(name=name))
        assert "invalid pass name" in expect_refusal(conn)
    server.join()
    assert all_files(root) == []
    with pytest.raises(TransferError, match="invalid pass name"):
        send_pass(HOST, server.port, TOKEN, local, name)


# -- TLS -----------------------------------------------------------------------------------


def make_cert(d: Path, cn: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary to make a self-signed certificate")
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={cn}",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_pair(tmp_path: Path) -> Iterator[Callable[[str], tuple[Path, Path]]]:
    yield lambda cn: make_cert(tmp_path / cn, cn)


def test_tls_round_trip(root: Path, local: Path, tls_pair: Callable[[str], tuple[Path, Path]]
                        ) -> None:
    cert, key = tls_pair("server")
    server = Server(root, tls=server_tls_context(cert, key))
    send_pass(HOST, server.port, TOKEN, local, "1", tls=client_tls_context(cert))
    server.join()
    for name in ("inventory.img", "pages-4242.img"):
        assert (root / "1" / name).read_bytes() == (local / name).read_bytes()


def test_tls_server_with_another_ca_is_refused(
    root: Path, local: Path, tls_pair: Callable[[str], tuple[Path, Path]]
) -> None:
    cert, key = tls_pair("server")
    other, _ = tls_pair("other")
    server = Server(root, tls=server_tls_context(cert, key))
    with pytest.raises(TransferError, match=r"TLS handshake with .* failed: .*CERTIFICATE_VERIFY"):
        send_pass(HOST, server.port, TOKEN, local, "1", tls=client_tls_context(other))
    server.join()
    assert all_files(root) == []


def test_plain_client_against_tls_server_is_refused(
    root: Path, local: Path, tls_pair: Callable[[str], tuple[Path, Path]]
) -> None:
    cert, key = tls_pair("server")
    server = Server(root, tls=server_tls_context(cert, key))
    with pytest.raises(TransferError):
        send_pass(HOST, server.port, TOKEN, local, "1")
    server.join()
    assert all_files(root) == []


def test_tls_context_errors(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="cannot load TLS certificate"):
        server_tls_context(tmp_path / "nope.pem", tmp_path / "nope.key")
    with pytest.raises(TransferError, match="cannot load TLS CA file"):
        client_tls_context(tmp_path / "nope.pem")
