"""A parent and its child talking over a socketpair, with bytes in flight both ways.

usage: tree_unix.py [stream|seqpacket|listener PATH]

The parent makes a unix socketpair and forks; each keeps one end. With "listener", the
parent listens on PATH instead and forks; the child (which keeps the listener open too)
accepts the parent's connection: the accepted end is the child's, the connecting one the
parent's. Every 10 ms each side
sends its next record ("<side> <n>", fixed width) and reads one of the other's only once
more than LAG of them are queued (FIONREAD), so at any moment each direction holds about
LAG records a checkpoint must carry. Each side checks that the records it reads are the
other's 0, 1, 2, ... exactly (nothing lost, nothing duplicated) and prints
"<side> got <n>" every 20 records, or "ERROR ..." and exits 1.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import termios
import time

WIDTH = 32  # bytes per record
LAG = 8  # records left queued before one is read


def say(line: str) -> None:
    """One line in one write(2): parent and child share the output file's offset, and
    print's separate writes of text and newline could interleave between them."""
    os.write(1, (line + "\n").encode())


def queued(s: socket.socket) -> int:
    buf = bytearray(4)
    fcntl.ioctl(s.fileno(), termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def talk(s: socket.socket, me: str, peer: str, stream: bool) -> None:
    sent = expected = 0
    while True:
        s.sendall(f"{me} {sent}".ljust(WIDTH).encode())
        sent += 1
        if queued(s) > LAG * WIDTH:
            if stream:
                data = b""
                while len(data) < WIDTH:
                    data += s.recv(WIDTH - len(data))
            else:
                data = s.recv(WIDTH * 2)
            got = data.decode().split()
            if got != [peer, str(expected)]:
                say(f"ERROR {me} expected {peer} {expected}, got {data!r}")
                sys.exit(1)
            if expected % 20 == 0:
                say(f"{me} got {expected}")
            expected += 1
        time.sleep(0.01)


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "stream"
    if kind == "listener":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sys.argv[2])
        listener.listen(4)
        if os.fork() == 0:
            accepted, _ = listener.accept()
            talk(accepted, "child", "parent", True)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(sys.argv[2])
        talk(client, "parent", "child", True)
    stream = kind == "stream"
    a, b = socket.socketpair(socket.AF_UNIX,
                             socket.SOCK_STREAM if stream else socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        a.close()
        talk(b, "child", "parent", stream)
    b.close()
    talk(a, "parent", "child", stream)


if __name__ == "__main__":
    main()
