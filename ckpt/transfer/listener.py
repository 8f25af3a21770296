"""The page server's connection handling: many clients at once, none able to stall it.

    accept ──► admission(open connections, from that host, Limits)
                 over a bound ──► Ack{ok=false, "page server busy ..."} and close (plain
                                  TCP; with TLS simply close); the client asks again
                 within ──► one thread for the connection (at most max_connections)
    connection thread ──► handler(sock, peer)           (TLS and authentication must end
                                                        within the handshake deadline)
                          any exception ──► one log line naming the peer and the reason

What a connection holds is bounded: one frame (header ≤ 64 KiB, payload ≤ 1 MiB) at a
time, a refusal drains for at most a few seconds, and files are streamed to disk.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ckpt.images.pb import wire_pb2
from ckpt.transfer.wire import BUSY, HANDSHAKE_TIMEOUT, Conn, TransferError, _why

log = logging.getLogger("ckpt.transfer")

MAX_CONNECTIONS = 64
MAX_PER_PEER = 16
ACCEPT_PAUSE = 0.1  # seconds to wait when accept() fails for want of resources

Handler = Callable[[socket.socket, str], None]


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = HANDSHAKE_TIMEOUT  # TLS + authentication, whole
    max_connections: int = MAX_CONNECTIONS  # open at once, in total
    max_per_peer: int = MAX_PER_PEER  # open at once from one host


def admission(total: int, from_host: int, limits: Limits) -> str:
    """Why one more connection is refused while ``total`` are open, ``from_host`` of them
    from its host; '' to admit it."""
    if total >= limits.max_connections:
        return f"{BUSY}: {total} connections open (at most {limits.max_connections})"
    if from_host >= limits.max_per_peer:
        return (f"{BUSY}: {from_host} connections open from your host "
                f"(at most {limits.max_per_peer})")
    return ""


def listen(address: str, port: int) -> socket.socket:
    """A listening TCP socket on address:port (IPv6 when the address has a ':')."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        return socket.create_server((address, port), family=family, backlog=128)
    except OSError as exc:
        raise TransferError(f"cannot listen on {address}:{port}: {_why(exc)}") from None


class Listener:
    """Accepts connections and runs ``handler`` for each on its own thread."""

    def __init__(self, sock: socket.socket, handler: Handler, limits: Limits,
                 tls: ssl.SSLContext | None = None) -> None:
        self.sock = sock
        self.handler = handler
        self.limits = limits
        self.tls = tls
        self.lock = threading.Lock()
        self.open: Counter[str] = Counter()  # host → open connections

    def run(self, once: bool = False) -> None:
        """Serve until interrupted; with ``once``, serve the first connection (on this
        thread) and return."""
        while True:
            try:
                sock, addr = self.sock.accept()
            except OSError as exc:  # EMFILE, ENOBUFS, a connection reset before accept
                log.warning("page server: accept failed: %s", _why(exc))
                time.sleep(ACCEPT_PAUSE)
                continue
            host, peer = addr[0], f"{addr[0]}:{addr[1]}"
            if once:
                self._serve(sock, host, peer, counted=False)
                return
            with self.lock:
                why = admission(sum(self.open.values()), self.open[host], self.limits)
                if not why:
                    self.open[host] += 1
            if why:
                log.warning("page server: %s refused: %s", peer, why)
                self._refuse(sock, peer, why)
                continue
            try:
                threading.Thread(target=self._serve, args=(sock, host, peer),
                                 name=f"page server {peer}", daemon=True).start()
            except RuntimeError as exc:  # no thread to be had: this one is dropped
                log.warning("page server: %s dropped: %s", peer, exc)
                self._release(host)
                sock.close()

    def _serve(self, sock: socket.socket, host: str, peer: str, counted: bool = True) -> None:
        try:
            log.info("page server: %s connected", peer)
            self.handler(sock, peer)
        except TransferError as exc:
            log.warning("page server: %s: %s", peer, str(exc).removeprefix(f"{peer}: "))
        except Exception as exc:  # a bug in one connection must not end the others
            log.error("page server: %s: internal error: %s: %s", peer, type(exc).__name__,
                      exc)
            log.debug("page server: %s: traceback", peer, exc_info=True)
        else:
            log.info("page server: %s done", peer)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            if counted:
                self._release(host)

    def _release(self, host: str) -> None:
        with self.lock:
            self.open[host] -= 1
            if self.open[host] <= 0:
                del self.open[host]

    def _refuse(self, sock: socket.socket, peer: str, why: str) -> None:
        """Tell a connection over the bounds why, without ever waiting on it: the Ack fits
        an empty send buffer, and whatever it sent already (its Hello) is read so the
        close is a clean FIN. A TLS peer is simply closed (that would need a handshake)."""
        conn = Conn(sock, peer)
        with contextlib.suppress(OSError, TransferError):
            sock.setblocking(False)
            if self.tls is None:
                conn.send(wire_pb2.Ack(ok=False, error=why))
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(1 << 16):
                    pass
        conn.close()
