"""The page-server wire protocol: framing, authentication, TLS contexts, name rules.

Every frame, both ways::

    u32 header_len | u32 payload_len | header | payload          (little endian)
    header = u8 type tag | one serialized ckpt.wire message (proto/wire.proto)

header_len counts the tag byte (1..MAX_HEADER); payload_len is 0 except for FileData
frames, which carry at most MAX_CHUNK (1 MiB) bytes of file data, so a file is streamed
and never held in memory whole.

A connection (PROTOCOL_VERSION 1)::

    C->S Hello{protocol_version, client_nonce, role=ROLE_SEND}
    S->C Challenge{server_nonce, protocol_version}    (other version: Ack{ok=false}, close)
    C->S Auth{mac = HMAC-SHA256(token, "ckpt-wire-1 client" | client_nonce | server_nonce)}
    S->C AuthOk{mac = HMAC-SHA256(token, "ckpt-wire-1 server" | client_nonce | server_nonce)}
                                                      (bad mac: Ack{ok=false}, close)
    then any number of passes:
    C->S PassStart{name}
         (FileStart{name, size, mode}  FileData+  FileEnd{crc32})*
         PassEnd{name}
    S->C Ack{ok=true}                                 (any error: Ack{ok=false, error}, close)

The shared token is never sent; both sides prove they hold it (the client first), nonces
are 32 random bytes from each side. The channel can be wrapped in TLS (ssl module).

A server over its connection bounds answers the Hello with Ack{ok=false, error=BUSY...}
before any Challenge; that refusal is temporary and the client tries again.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import math
import os
import re
import secrets
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ckpt.errors import CkptError
from ckpt.images.pb import wire_pb2

PROTOCOL_VERSION = 1
MAX_CHUNK = 1 << 20  # largest FileData payload
MAX_HEADER = 64 << 10  # largest header (tag + message)
NONCE_SIZE = 32
AUTH_TIMEOUT = 30.0  # seconds a client waits for each step of the handshake
HANDSHAKE_TIMEOUT = 5.0  # seconds a server gives a client for TLS and authentication
REFUSE_DRAIN = 2.0  # seconds a refusal keeps reading so the peer gets to see it
SMALL = 64 << 10  # frames up to this size are sent with one sendall
IO_TIMEOUT = 120.0  # seconds a peer may stay silent mid-transfer

BUSY = "page server busy"  # how every over-the-bound refusal's reason starts
_PREFIX = struct.Struct("<II")
_NAME = re.compile(r"[A-Za-z0-9._-]+")


class TransferError(CkptError):
    """Sending or receiving images over the wire failed (one line)."""


class MsgType(enum.IntEnum):
    """The 1-byte tag before every header message."""

    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    AUTH_OK = 4
    PASS_START = 5
    FILE_START = 6
    FILE_DATA = 7
    FILE_END = 8
    PASS_END = 9
    ACK = 10
    RESTORE_REQUEST = 11
    RESTORE_DONE = 12
    COMMIT = 13
    COMPAT_CHECK = 14
    SYNC = 15


_CLASSES: dict[MsgType, type[Message]] = {
    MsgType.HELLO: wire_pb2.Hello,
    MsgType.CHALLENGE: wire_pb2.Challenge,
    MsgType.AUTH: wire_pb2.Auth,
    MsgType.AUTH_OK: wire_pb2.AuthOk,
    MsgType.PASS_START: wire_pb2.PassStart,
    MsgType.FILE_START: wire_pb2.FileStart,
    MsgType.FILE_DATA: wire_pb2.FileData,
    MsgType.FILE_END: wire_pb2.FileEnd,
    MsgType.PASS_END: wire_pb2.PassEnd,
    MsgType.ACK: wire_pb2.Ack,
    MsgType.RESTORE_REQUEST: wire_pb2.RestoreRequest,
    MsgType.RESTORE_DONE: wire_pb2.RestoreDone,
    MsgType.COMMIT: wire_pb2.Commit,
    MsgType.COMPAT_CHECK: wire_pb2.CompatCheck,
    MsgType.SYNC: wire_pb2.Sync,
}
_TAGS: dict[type[Message], MsgType] = {cls: tag for tag, cls in _CLASSES.items()}

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Frame:
    type: MsgType
    msg: Message
    payload: bytes


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class Conn:
    """One framed connection over a (possibly TLS) socket; owns and closes the socket.

    With a ``deadline`` (time.monotonic()), no send or receive waits past it, however the
    peer trickles its bytes: the socket timeout is what is left of it before each call."""

    def __init__(self, sock: socket.socket, peer: str, deadline: float | None = None) -> None:
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small frames (an Ack, a short final pass) must not wait ~40 ms for Nagle
            # and delayed ACKs: that would be migration downtime.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending -----------------------------------------------------------------------

    def send(self, msg: Message, payload: bytes | memoryview = b"") -> None:
        tag = _TAGS[type(msg)]
        if len(payload) > MAX_CHUNK:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_CHUNK}")
        if payload and tag is not MsgType.FILE_DATA:
            raise ValueError(f"{tag.name} frames carry no payload")
        header = bytes([tag]) + msg.SerializeToString()
        try:
            self._bound()
            head = _PREFIX.pack(len(header), len(payload)) + header
            if len(payload) <= SMALL:  # one segment for the frame
                self.sock.sendall(head + payload)
            else:
                self.sock.sendall(head)
                self.sock.sendall(payload)
        except (OSError, ssl.SSLError) as exc:
            raise TransferError(f"connection to {self.peer} lost: {_why(exc)}") from None

    def _bound(self) -> None:
        """Make the next socket call end by the deadline (TimeoutError once it passed)."""
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)

    def send_data(self, chunk: bytes | memoryview) -> None:
        self.send(wire_pb2.FileData(), chunk)

    # -- receiving ---------------------------------------------------------------------

    def _recv_exact(self, n: int, *, eof_ok: bool = False) -> bytes | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                self._bound()
                k = self.sock.recv_into(view[got:], n - got)
            except (OSError, ssl.SSLError) as exc:
                raise TransferError(f"connection to {self.peer} lost: {_why(exc)}") from None
            if k == 0:
                if eof_ok and got == 0:
                    return None
                raise TransferError(f"connection to {self.peer} closed mid-frame")
            got += k
        return bytes(buf)

    def recv(self, *, eof_ok: bool = False) -> Frame | None:
        """The next frame; None on a clean close between frames if eof_ok."""
        prefix = self._recv_exact(_PREFIX.size, eof_ok=eof_ok)
        if prefix is None:
            return None
        header_len, payload_len = _PREFIX.unpack(prefix)
        if not 1 <= header_len <= MAX_HEADER or payload_len > MAX_CHUNK:
            raise TransferError(f"{self.peer} does not speak the ckpt wire protocol")
        header = self._recv_exact(header_len)
        assert header is not None
        try:
            tag = MsgType(header[0])
        except ValueError:
            raise TransferError(f"{self.peer} sent unknown message type {header[0]}") from None
        msg = _CLASSES[tag]()
        try:
            msg.ParseFromString(header[1:])
        except DecodeError:
            raise TransferError(f"{self.peer} sent a malformed {tag.name} message") from None
        if payload_len and tag is not MsgType.FILE_DATA:
            raise TransferError(f"{self.peer} sent a payload with a {tag.name} message")
        payload = self._recv_exact(payload_len) if payload_len else b""
        assert payload is not None
        return Frame(tag, msg, payload)

    def expect(self, cls: type[M]) -> M:
        """The next frame's message, which must be a cls; an Ack{ok=false} instead is
        the peer's error, raised as a TransferError."""
        frame = self.recv()
        assert frame is not None
        if isinstance(frame.msg, cls):
            return frame.msg
        if isinstance(frame.msg, wire_pb2.Ack) and not frame.msg.ok:
            raise TransferError(f"{self.peer} refused: {frame.msg.error or 'no reason given'}")
        raise TransferError(
            f"{self.peer} sent {frame.type.name}, expected {_TAGS[cls].name} (protocol error)"
        )

    def refuse(self, error: str) -> None:
        """Best effort: tell the peer why we give up (Ack{ok=false}), stop sending, and
        drain what it is still sending, for at most REFUSE_DRAIN seconds (a trickling peer
        cannot hold us longer), so it gets to read the reason."""
        with contextlib.suppress(OSError, TransferError):
            self.send(wire_pb2.Ack(ok=False, error=error))
            self.deadline = min(self.deadline or math.inf, time.monotonic() + REFUSE_DRAIN)
            if not isinstance(self.sock, ssl.SSLSocket):
                self.sock.shutdown(socket.SHUT_WR)
            while True:
                self._bound()
                if not self.sock.recv(MAX_CHUNK):
                    break


# -- authentication ----------------------------------------------------------------------


def _mac(token: bytes, side: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    label = b"ckpt-wire-%d %s" % (PROTOCOL_VERSION, side)
    return hmac.new(token, label + client_nonce + server_nonce, hashlib.sha256).digest()


def check_token(token: bytes | str) -> bytes:
    """The token as bytes; an empty one is refused."""
    raw = token.encode() if isinstance(token, str) else bytes(token)
    if not raw.strip():
        raise TransferError("empty authentication token refused")
    return raw


def load_token(path: str | os.PathLike[str]) -> bytes:
    """Read the shared token from a file (surrounding whitespace stripped)."""
    try:
        raw = Path(path).read_bytes().strip()
    except OSError as exc:
        raise TransferError(f"cannot read auth token file {path}: {_why(exc)}") from None
    if not raw:
        raise TransferError(f"auth token file {path} is empty")
    return raw


def client_handshake(conn: Conn, token: bytes) -> None:
    """Prove we hold the token and check that the server does too."""
    client_nonce = secrets.token_bytes(NONCE_SIZE)
    conn.send(
        wire_pb2.Hello(
            protocol_version=PROTOCOL_VERSION, client_nonce=client_nonce, role=wire_pb2.ROLE_SEND
        )
    )
    challenge = conn.expect(wire_pb2.Challenge)
    if challenge.protocol_version != PROTOCOL_VERSION:
        raise TransferError(
            f"{conn.peer} speaks protocol version {challenge.protocol_version}, "
            f"this ckpt speaks version {PROTOCOL_VERSION}"
        )
    if len(challenge.server_nonce) != NONCE_SIZE:
        raise TransferError(f"{conn.peer} sent a malformed challenge")
    conn.send(wire_pb2.Auth(mac=_mac(token, b"client", client_nonce, challenge.server_nonce)))
    try:
        ok = conn.expect(wire_pb2.AuthOk)
    except TransferError as exc:
        raise TransferError(f"authentication failed: {exc}") from None
    want = _mac(token, b"server", client_nonce, challenge.server_nonce)
    if not hmac.compare_digest(ok.mac, want):
        raise TransferError(
            f"authentication failed: {conn.peer} does not hold the same token"
        )


def server_handshake(conn: Conn, token: bytes) -> None:
    """Check the client's proof of the token, then prove ours. On failure the client is
    told why (Ack{ok=false}) and a TransferError is raised."""
    hello = conn.expect(wire_pb2.Hello)
    if hello.protocol_version != PROTOCOL_VERSION:
        error = (
            f"protocol version {hello.protocol_version} not supported "
            f"(this page server speaks version {PROTOCOL_VERSION})"
        )
        conn.refuse(error)
        raise TransferError(f"{conn.peer}: {error}")
    if hello.role != wire_pb2.ROLE_SEND:
        conn.refuse("unsupported role")
        raise TransferError(f"{conn.peer}: unsupported role {hello.role}")
    if len(hello.client_nonce) != NONCE_SIZE:
        conn.refuse("malformed hello")
        raise TransferError(f"{conn.peer}: malformed hello")
    server_nonce = secrets.token_bytes(NONCE_SIZE)
    conn.send(wire_pb2.Challenge(server_nonce=server_nonce, protocol_version=PROTOCOL_VERSION))
    auth = conn.expect(wire_pb2.Auth)
    want = _mac(token, b"client", hello.client_nonce, server_nonce)
    if not hmac.compare_digest(auth.mac, want):
        conn.refuse("wrong token")
        raise TransferError(f"{conn.peer}: authentication failed (wrong token)")
    conn.send(wire_pb2.AuthOk(mac=_mac(token, b"server", hello.client_nonce, server_nonce)))


# -- names -------------------------------------------------------------------------------


def check_name(name: str, what: str) -> str:
    """A pass or file name must be one plain path component of [A-Za-z0-9._-], not
    starting with "." (no "..", no hidden temp names). The server refuses any other; a
    client checks with this same rule before it touches a target."""
    if not _NAME.fullmatch(name) or name.startswith("."):
        raise TransferError(f"invalid {what} name {name!r}")
    return name


def pass_name(images_dir: str | os.PathLike[str]) -> str:
    """The name a pass written to ``images_dir`` gets on the page server: the directory's
    own name, so that parent links (../1) resolve there as they do here."""
    name = os.path.basename(os.path.normpath(os.fspath(images_dir)))
    try:
        return check_name(name, "pass")
    except TransferError:
        raise TransferError(f"the page server stores a pass under its directory's name, and "
                            f"{name!r} (from -D {os.fspath(images_dir)}) is not one it "
                            "accepts: use letters, digits, '.', '_' or '-'") from None


# -- TLS ---------------------------------------------------------------------------------


def server_tls_context(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """TLS (1.2+) for a page server with this certificate chain and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise TransferError(f"cannot load TLS certificate {certfile}: {_why(exc)}") from None
    return ctx


def client_tls_context(cafile: str | os.PathLike[str]) -> ssl.SSLContext:
    """TLS (1.2+) for a client trusting only the CA (or self-signed cert) in cafile; the
    server's certificate must name the host it is reached by."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile)
    except (OSError, ssl.SSLError) as exc:
        raise TransferError(f"cannot load TLS CA file {cafile}: {_why(exc)}") from None
    return ctx
