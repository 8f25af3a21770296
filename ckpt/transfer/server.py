"""The page server: receives checkpoint passes and stores them in an images directory.

Each pass lands in images_dir/<pass name>/, each file written to ".<name>.tmp" and renamed
into place only once its whole size arrived and its CRC-32 matches, so a dropped connection
leaves no partial file. A pass's stale inventory.img is removed when the pass starts again,
and clients send inventory.img last: a pass directory holding an inventory.img is complete.
Connections are served concurrently (ckpt.transfer.listener); a pass name is held by one
connection at a time, from its PassStart (or RestoreRequest) to the connection's end.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckpt.errors import ImageError
from ckpt.images.pb import wire_pb2
from ckpt.images.safedir import WritableDir, make_dirs, unsafe_dir
from ckpt.transfer.handover import COMMIT_GRACE, Parked, restore_for_migration
from ckpt.transfer.listener import Limits, Listener, listen
from ckpt.transfer.prerestore import Prerestore
from ckpt.transfer.wire import (
    HANDSHAKE_TIMEOUT,
    IO_TIMEOUT,
    Conn,
    Frame,
    TransferError,
    _why,
    check_name,
    check_token,
    server_handshake,
)

log = logging.getLogger("ckpt.transfer")

INVENTORY = "inventory.img"


class Claims:
    """Which connection holds which pass name: two connections never write (or restore)
    one pass directory at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders: dict[str, Conn] = {}

    def claim(self, name: str, conn: Conn) -> str:
        """'' once ``conn`` holds ``name``; otherwise why not."""
        with self.lock:
            holder = self.holders.setdefault(name, conn)
        return "" if holder is conn else (
            f"pass {name} is in use by another connection (from {holder.peer})")

    def release(self, conn: Conn) -> None:
        with self.lock:
            for name in [n for n, c in self.holders.items() if c is conn]:
                del self.holders[name]


@dataclass
class Shared:
    """What every connection of one server shares."""

    parked: Parked = field(default_factory=Parked)
    claims: Claims = field(default_factory=Claims)


def serve(
    address: str,
    port: int,
    images_dir: str | os.PathLike[str],
    token: bytes | str,
    tls: ssl.SSLContext | None = None,
    once: bool = False,
    ready: Callable[[int], None] | None = None,
    commit_grace: float = COMMIT_GRACE,
    limits: Limits | None = None,
) -> None:
    """Listen on address:port and store the passes authenticated clients send.

    ready(port) is called once listening (with the bound port: pass port 0 for any free
    one). With once=True, return after the first connection closes, whatever its outcome.
    Per-connection errors are logged, never raised; setup errors raise TransferError.
    """
    key = check_token(token)
    limits = limits or Limits()
    root = Path(images_dir)
    try:
        make_dirs(root)
    except OSError as exc:
        raise TransferError(f"cannot create images directory {root}: {_why(exc)}") from None
    try:
        st = os.stat(root)
    except OSError as exc:
        raise TransferError(f"images directory {root}: {_why(exc)}") from None
    if why := unsafe_dir(str(root), st.st_uid, st.st_mode, os.geteuid()):
        raise TransferError(why)  # pass directories are made inside it
    shared = Shared(Parked(commit_grace))

    def handler(sock: socket.socket, peer: str) -> None:
        handle_connection(sock, peer, root, key, tls, shared, limits.handshake_timeout)

    with listen(address, port) as listener:
        if ready is not None:
            ready(listener.getsockname()[1])
        Listener(listener, handler, limits, tls).run(once)


def handle_connection(
    sock: socket.socket,
    peer: str,
    root: Path,
    token: bytes,
    tls: ssl.SSLContext | None = None,
    shared: Shared | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> None:
    """Serve one accepted connection to its end (closing sock); raise TransferError.
    TLS and authentication must be done within ``handshake_timeout`` seconds."""
    shared = shared or Shared()
    deadline = time.monotonic() + handshake_timeout
    sock.settimeout(handshake_timeout)  # bounds the whole TLS handshake
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise TransferError(f"{peer}: TLS handshake failed: {_why(exc)}") from None
    with Conn(sock, peer, deadline) as conn:
        try:
            server_handshake(conn, token)
        except TransferError:
            if time.monotonic() < deadline:
                raise
            raise TransferError(f"{peer}: not authenticated within {handshake_timeout:g} s: "
                                "dropped") from None
        conn.deadline = None
        sock.settimeout(IO_TIMEOUT)
        pre: Prerestore | None = None
        try:
            while True:
                frame = conn.recv(eof_ok=True)
                if frame is None:
                    return
                if isinstance(frame.msg, wire_pb2.RestoreRequest):
                    _claim(conn, shared.claims, frame.msg.pass_name)
                    pre = pre or Prerestore(peer)
                    restore_for_migration(conn, root, frame.msg.pass_name, pre, shared.parked)
                    return
                if isinstance(frame.msg, wire_pb2.Commit):  # a hand-over whose link broke
                    why = shared.parked.resume(frame.msg.pid)
                    conn.send(wire_pb2.Ack(ok=not why, error=why))
                    continue
                if isinstance(frame.msg, wire_pb2.Sync):
                    conn.send(wire_pb2.Ack(ok=True, error=pre.wait() if pre else ""))
                    continue
                if isinstance(frame.msg, wire_pb2.CompatCheck):
                    why = incompatibility(frame.msg)
                    conn.send(wire_pb2.Ack(ok=not why, error=why))
                    continue
                if isinstance(frame.msg, wire_pb2.PassStart):
                    _claim(conn, shared.claims, frame.msg.name)
                pass_dir = _receive_pass(conn, root, frame)
                if isinstance(frame.msg, wire_pb2.PassStart) and frame.msg.prerestore:
                    pre = pre or Prerestore(peer)
                    pre.apply(pass_dir)
        finally:
            if pre is not None:
                pre.close()
            shared.claims.release(conn)


def _claim(conn: Conn, claims: Claims, name: str) -> None:
    """Hold pass ``name`` for this connection, or refuse the connection."""
    why = claims.claim(name, conn)
    if why:
        conn.refuse(why)
        raise TransferError(f"{conn.peer}: {why}")


def incompatibility(req: wire_pb2.CompatCheck) -> str:
    """Why this host could not run the process described, or ''."""
    from ckpt.kernel.probe import probe_once

    caps = probe_once()
    if req.xstate_size and caps.xstate_size != req.xstate_size:
        return (f"CPU state differs: the process has {req.xstate_size} bytes of XSTATE, "
                f"this host {caps.xstate_size}")
    if req.xcr0 and caps.xcr0 is not None and req.xcr0 & ~caps.xcr0:
        return f"CPU lacks XSAVE features {req.xcr0 & ~caps.xcr0:#x} the process may use"
    here = caps.get("vdso-layout").detail
    if req.vdso_layout and req.vdso_layout != here:
        return f"vdso layout differs: {req.vdso_layout!r} there, {here!r} here"
    missing = [f for f in req.files if not os.path.exists(f)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"file {missing[0]} is missing on this host{more}"
    return ""


def _receive_pass(conn: Conn, root: Path, frame: Frame) -> Path:
    """Receive one pass, starting at its PassStart ``frame``; return its directory."""
    try:
        if not isinstance(frame.msg, wire_pb2.PassStart):
            raise TransferError(f"expected PassStart, got {frame.type.name}")
        name = check_name(frame.msg.name, "pass")
        pass_dir = _pass_dir(root, name)
        _unlink(pass_dir / INVENTORY)  # incomplete until a new inventory.img arrives
        # A pass replaces whatever an earlier pass of that name left (other pids' files)
        for stale in pass_dir.glob("*.img"):
            _unlink(stale)
        while True:
            nxt = conn.recv()
            assert nxt is not None
            if isinstance(nxt.msg, wire_pb2.FileStart):
                _receive_file(conn, pass_dir, nxt.msg)
            elif isinstance(nxt.msg, wire_pb2.PassEnd):
                if nxt.msg.name != name:
                    raise TransferError(f"PassEnd names {nxt.msg.name!r}, not {name!r}")
                break
            else:
                raise TransferError(f"expected FileStart or PassEnd, got {nxt.type.name}")
    except TransferError as exc:
        conn.refuse(str(exc))
        raise TransferError(f"{conn.peer}: {exc}") from None
    conn.send(wire_pb2.Ack(ok=True))
    log.info("page server: pass %s from %s stored in %s", name, conn.peer, pass_dir)
    return pass_dir


def _pass_dir(root: Path, name: str) -> Path:
    path = root / name
    try:
        make_dirs(path)
    except OSError as exc:
        raise TransferError(f"cannot create {path}: {_why(exc)}") from None
    _open_pass_dir(path, f"cannot create {path}").close()
    return path


def _open_pass_dir(path: Path, what: str) -> WritableDir:
    """The pass directory, opened and checked by the images layer's safedir (shared
    with local passes): the server's, not writable by others, not a symlink."""
    try:
        return WritableDir.open(path, follow=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise TransferError(f"{path} exists and is not a directory") from None
        raise TransferError(f"{what}: {_why(exc)}") from None
    except ImageError as exc:
        raise TransferError(str(exc)) from None


def _receive_file(conn: Conn, pass_dir: Path, start: wire_pb2.FileStart) -> None:
    name = check_name(start.name, "file")
    target = pass_dir / name
    out = _open_pass_dir(pass_dir, f"cannot write {target}")
    try:
        tmp = out.create(name, (start.mode & 0o700) or 0o600)
    except OSError as exc:
        out.close()
        raise TransferError(f"cannot write {target}: {_why(exc)}") from None
    committed = False
    try:
        with open(tmp.fd, "wb", closefd=False) as f:
            got = 0
            crc = 0
            end_crc = -1
            while True:
                frame = conn.recv()
                assert frame is not None
                if isinstance(frame.msg, wire_pb2.FileData):
                    got += len(frame.payload)
                    if got > start.size:
                        raise TransferError(
                            f"{name}: more data than the {start.size} bytes announced"
                        )
                    crc = zlib.crc32(frame.payload, crc)
                    f.write(frame.payload)
                elif isinstance(frame.msg, wire_pb2.FileEnd):
                    end_crc = frame.msg.crc32
                    break
                else:
                    raise TransferError(
                        f"{name}: expected FileData or FileEnd, got {frame.type.name}"
                    )
        if got != start.size:
            raise TransferError(f"{name}: {got} bytes received, {start.size} announced")
        if end_crc != crc:
            raise TransferError(f"{name}: CRC mismatch, file corrupted in transit")
        tmp.commit()
        committed = True
    except OSError as exc:
        raise TransferError(f"cannot write {target}: {_why(exc)}") from None
    finally:
        if not committed:
            tmp.discard()
        out.close()


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
