"""Send one checkpoint pass (an images directory) to a page server."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ckpt.images.pb import wire_pb2
from ckpt.transfer.wire import (
    AUTH_TIMEOUT,
    BUSY,
    IO_TIMEOUT,
    MAX_CHUNK,
    Conn,
    TransferError,
    _why,
    check_name,
    check_token,
    client_handshake,
)

INVENTORY = "inventory.img"
BUSY_WAIT = 30.0  # seconds a client keeps asking a page server at its connection bound


@dataclass(frozen=True)
class PassSent:
    files: int
    bytes: int


def pass_files(local_dir: Path) -> list[str]:
    """The image files of a complete pass, inventory.img last (it marks the pass complete
    on the server, as it does locally). Temp files (".*") are skipped."""
    try:
        entries = list(os.scandir(local_dir))
    except OSError as exc:
        raise TransferError(f"cannot read images directory {local_dir}: {_why(exc)}") from None
    names = sorted(
        e.name
        for e in entries
        if e.name.endswith(".img")
        and not e.name.startswith(".")
        and e.is_file(follow_symlinks=False)
    )
    if INVENTORY not in names:
        raise TransferError(f"{local_dir} holds no complete ckpt images (inventory.img missing)")
    for name in names:
        check_name(name, "file")
    names.remove(INVENTORY)
    return [*names, INVENTORY]


def connect(host: str, port: int, token: bytes | str, tls: ssl.SSLContext | None = None,
            ) -> Conn:
    """An authenticated connection to a page server (TLS first, when given). A server at
    its connection bound says so (BUSY) and is asked again for up to BUSY_WAIT seconds:
    its slots free up as unauthenticated connections reach their handshake deadline."""
    key = check_token(token)
    deadline = time.monotonic() + BUSY_WAIT
    pause = 0.1
    while True:
        try:
            return _connect_once(host, port, key, tls)
        except TransferError as exc:
            if f"refused: {BUSY}" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


def _connect_once(host: str, port: int, key: bytes, tls: ssl.SSLContext | None) -> Conn:
    peer = f"page server {host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=AUTH_TIMEOUT)
    except OSError as exc:
        raise TransferError(f"cannot connect to {peer}: {_why(exc)}") from None
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise TransferError(f"TLS handshake with {peer} failed: {_why(exc)}") from None
    conn = Conn(sock, peer)
    try:
        client_handshake(conn, key)
    except BaseException:
        conn.close()
        raise
    sock.settimeout(IO_TIMEOUT)
    return conn


def check_server(host: str, port: int, token: bytes | str,
                 tls: ssl.SSLContext | None = None) -> None:
    """Authenticate and hang up: lets a pass fail before it touches the target."""
    connect(host, port, token, tls).close()


def send_pass(
    host: str,
    port: int,
    token: bytes | str,
    local_dir: str | os.PathLike[str],
    pass_name: str,
    tls: ssl.SSLContext | None = None,
) -> PassSent:
    """Connect, authenticate, stream every image file of local_dir into the server's
    <images dir>/<pass_name>/, and wait for its Ack. Raises TransferError on failure."""
    check_name(pass_name, "pass")
    pass_files(Path(local_dir))  # fail before connecting
    with connect(host, port, token, tls) as conn:
        return send_pass_on(conn, local_dir, pass_name)


def send_pass_on(conn: Conn, local_dir: str | os.PathLike[str], pass_name: str,
                 prerestore: bool = False) -> PassSent:
    """send_pass over an authenticated connection that stays open. With ``prerestore``
    the server also applies the pass to the process it builds for this connection."""
    check_name(pass_name, "pass")
    src = Path(local_dir)
    names = pass_files(src)
    total = 0
    try:
        conn.send(wire_pb2.PassStart(name=pass_name, prerestore=prerestore))
        for name in names:
            total += _send_file(conn, src / name, name)
        conn.send(wire_pb2.PassEnd(name=pass_name))
    except TransferError as exc:
        # the server may have given up first: its reason beats "connection lost"
        raise _server_reason(conn) or exc from None
    ack = conn.expect(wire_pb2.Ack)
    if not ack.ok:
        raise TransferError(f"{conn.peer} refused: {ack.error or 'no reason given'}")
    return PassSent(files=len(names), bytes=total)


def restore_remote(conn: Conn, pass_name: str) -> wire_pb2.RestoreDone:
    """Ask the server to restore a pass it holds; the process stays stopped until
    commit_remote (or dies when this connection ends without it)."""
    conn.send(wire_pb2.RestoreRequest(pass_name=pass_name))
    done = conn.expect(wire_pb2.RestoreDone)
    if not done.ok:
        raise TransferError(f"restore on {conn.peer} failed: {done.error}")
    return done


def sync_remote(conn: Conn) -> str:
    """Wait until the server has applied every prerestore pass; '' or why it gave up its
    warm restore (the final restore will then be a full one)."""
    conn.send(wire_pb2.Sync())
    return conn.expect(wire_pb2.Ack).error


def commit_remote(conn: Conn, pid: int = 0) -> None:
    """Let the process restored by restore_remote run: the one of this connection, or
    (on a new connection, after the first broke) the one restored as ``pid``."""
    conn.send(wire_pb2.Commit(pid=pid))
    ack = conn.expect(wire_pb2.Ack)
    if not ack.ok:
        raise TransferError(f"{conn.peer} did not resume the process: {ack.error}")


def commit_deferred(conn: Conn) -> str:
    """Commit a tree the destination restores only now, its source killed
    (RestoreDone{pid=0}, ckpt.transfer.tree): '' once it runs there, or why it could not
    be restored (nothing of it runs there). TransferError: the link broke, and whether it
    runs there is unknown."""
    conn.send(wire_pb2.Commit())
    ack = conn.expect(wire_pb2.Ack)
    return "" if ack.ok else (ack.error or "no reason given")


def _send_file(conn: Conn, path: Path, name: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise TransferError(f"cannot read {path}: {_why(exc)}") from None
    with open(fd, "rb", buffering=0) as f:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise TransferError(f"cannot read {path}: {_why(exc)}") from None
        if not stat.S_ISREG(st.st_mode):
            raise TransferError(f"{path} is not a regular file")
        conn.send(wire_pb2.FileStart(name=name, size=st.st_size, mode=st.st_mode & 0o777))
        buf = bytearray(MAX_CHUNK)
        view = memoryview(buf)
        sent = 0
        crc = 0
        while True:
            try:
                n = f.readinto(view)
            except OSError as exc:
                raise TransferError(f"cannot read {path}: {_why(exc)}") from None
            if not n:
                break
            if sent + n > st.st_size:
                raise TransferError(f"{path} changed while it was being sent")
            chunk = view[:n]
            crc = zlib.crc32(chunk, crc)
            conn.send_data(chunk)
            sent += n
        if sent != st.st_size:
            raise TransferError(f"{path} changed while it was being sent")
        conn.send(wire_pb2.FileEnd(crc32=crc))
    return sent


def _server_reason(conn: Conn) -> TransferError | None:
    """The server's Ack{ok=false} reason, if it sent one before the connection broke."""
    try:
        conn.sock.settimeout(2.0)
        frame = conn.recv(eof_ok=True)
    except (TransferError, OSError):
        return None
    if frame is not None and isinstance(frame.msg, wire_pb2.Ack) and not frame.msg.ok:
        return TransferError(f"{conn.peer} refused: {frame.msg.error or 'no reason given'}")
    return None


def check_compat(conn: Conn, req: wire_pb2.CompatCheck) -> None:
    """Ask the destination whether it can run the process; TransferError if not."""
    conn.send(req)
    ack = conn.expect(wire_pb2.Ack)
    if not ack.ok:
        raise TransferError(f"{conn.peer} cannot run this process: {ack.error}")
