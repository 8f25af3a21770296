"""Real daemons from Debian's packages, checkpointed and restored with their fds.

redis-server: a pipe to itself, an epoll set, IPv4 and IPv6 listening sockets, 5
threads. memcached: worker threads each with its own epoll set, eventfd and notification
pipe. Each is filled with keys, dumped (plain, or predump + dump --incremental), restored,
and must then serve every key back, take new ones, and accept new connections on both
addresses with all its threads alive.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from conftest import Harness, assert_ckpt_ok, run_ckpt, thread_ids, wait_for

KEYS = 300


def free_port() -> int:
    """A TCP port free on both 127.0.0.1 and ::1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6) as s6:
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s6.bind(("::1", 0))
            port: int = s6.getsockname()[1]
            with socket.socket() as s4:
                try:
                    s4.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    pytest.fail("no port free on both 127.0.0.1 and ::1")


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (.ci/run installs it)")
    return path


def talk(host: str, port: int, data: bytes, until: Callable[[bytes], bool]) -> bytes:
    """Send ``data`` on a new connection and read until ``until`` says the reply is whole."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(10)
        s.connect((host, port))
        s.sendall(data)
        reply = b""
        while not until(reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


# --------------------------------------------------------------------------- redis


def resp(*args: str) -> bytes:
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        out += f"${len(a.encode())}\r\n{a}\r\n".encode()
    return out


def redis(host: str, port: int, commands: Sequence[tuple[str, ...]]) -> list[str]:
    """Run commands pipelined on one connection; one reply line each (bulk strings'
    value, "(nil)" for a missing key)."""
    payload = b"".join(resp(*c) for c in commands)

    def parse(reply: bytes) -> list[str] | None:
        out: list[str] = []
        lines = reply.split(b"\r\n")
        i = 0
        while len(out) < len(commands):
            if i >= len(lines) - 1:
                return None
            line = lines[i].decode()
            if line.startswith("$"):
                if line == "$-1":
                    out.append("(nil)")
                    i += 1
                    continue
                if i + 1 >= len(lines) - 1:
                    return None
                out.append(lines[i + 1].decode())
                i += 2
            else:
                out.append(line)
                i += 1
        return out

    reply = talk(host, port, payload, lambda r: parse(r) is not None)
    parsed = parse(reply)
    assert parsed is not None, f"incomplete reply from redis: {reply[-200:]!r}"
    return parsed


def start_redis(harness: Harness) -> tuple[subprocess.Popen[bytes], int]:
    exe = require("redis-server")
    port = free_port()
    proc = harness.launch([exe, "--port", str(port), "--bind", "127.0.0.1 ::1",
                           "--save", "", "--appendonly", "no", "--dir", str(harness.tmp),
                           "--protected-mode", "no", "--daemonize", "no"],
                          harness.tmp / "redis.out")
    wait_for(lambda: _answers(lambda: redis("127.0.0.1", port, [("PING",)]) == ["+PONG"]),
             15, "redis answering PING")
    return proc, port


def _answers(probe: Callable[[], bool]) -> bool | None:
    try:
        return probe() or None
    except OSError:
        return None


def fill_redis(port: int) -> None:
    sets = [("SET", f"key:{i}", f"value-{i}-" + "x" * (i % 97)) for i in range(KEYS)]
    assert redis("127.0.0.1", port, sets) == ["+OK"] * KEYS
    assert redis("::1", port, [("RPUSH", "list", *map(str, range(50)))]) == [":50"]


def check_redis(port: int, extra: int = 0) -> None:
    gets = [("GET", f"key:{i}") for i in range(KEYS)]
    want = [f"value-{i}-" + "x" * (i % 97) for i in range(KEYS)]
    assert redis("127.0.0.1", port, gets) == want
    assert redis("::1", port, [("LLEN", "list"), ("DBSIZE",)]) == [":50",
                                                                f":{KEYS + 1 + extra}"]
    assert redis("::1", port, [("SET", "after", "restore"), ("INCR", "n")]) == ["+OK", ":1"]
    assert redis("127.0.0.1", port, [("GET", "after"), ("INCR", "n")]) == ["restore", ":2"]


@pytest.mark.parametrize("how", ["dump", "predump+incremental"])
def test_redis_serves_every_key_after_restore(harness: Harness, how: str) -> None:
    proc, port = start_redis(harness)
    fill_redis(port)
    threads = len(thread_ids(proc.pid))
    images = dump_daemon(harness, proc, how, lambda: fill_more_redis(port))
    pid = harness.restore_detached(images)
    check_redis(port, extra=0 if how == "dump" else 1)
    if how != "dump":
        assert redis("127.0.0.1", port, [("GET", "late")]) == ["written between passes"]
    assert len(thread_ids(pid)) == threads


def fill_more_redis(port: int) -> None:
    assert redis("127.0.0.1", port, [("SET", "late", "written between passes")]) == ["+OK"]


def dump_daemon(harness: Harness, proc: subprocess.Popen[bytes], how: str,
                between: Callable[[], None]) -> Path:
    """Dump ``proc`` (killing it): plainly, or a predump, ``between``, then an incremental
    dump on top; return the images to restore."""
    if how == "dump":
        images = harness.images()
        harness.dump_and_reap(proc, images)
        return images
    first, final = harness.images("pre"), harness.images("final")
    assert_ckpt_ok(run_ckpt("predump", "-t", str(proc.pid), "-D", first))
    between()
    harness.dump_and_reap(proc, final, "--incremental", "--prev-images-dir", "../pre")
    return final


# --------------------------------------------------------------------------- memcached


def memcached(host: str, port: int, request: str, end: str) -> str:
    reply = talk(host, port, request.encode(), lambda r: r.endswith(end.encode()))
    return reply.decode()


def start_memcached(harness: Harness) -> tuple[subprocess.Popen[bytes], int]:
    exe = require("memcached")
    port = free_port()
    proc = harness.launch([exe, "-u", "nobody", "-l", "127.0.0.1,[::1]", "-p", str(port),
                           "-U", "0", "-t", "4", "-m", "64"], harness.tmp / "memcached.out")
    wait_for(lambda: _answers(lambda: "STAT pid" in memcached("127.0.0.1", port, "stats\r\n",
                                                               "END\r\n")),
             15, "memcached answering stats")
    return proc, port


def mc_set(host: str, port: int, pairs: list[tuple[str, str]]) -> None:
    req = "".join(f"set {k} 0 0 {len(v)}\r\n{v}\r\n" for k, v in pairs)
    reply = talk(host, port, req.encode(), lambda r: r.count(b"\r\n") >= len(pairs))
    assert reply.decode().split("\r\n")[:-1] == ["STORED"] * len(pairs)


def mc_get(host: str, port: int, keys: list[str]) -> dict[str, str]:
    reply = memcached(host, port, f"get {' '.join(keys)}\r\n", "END\r\n")
    out: dict[str, str] = {}
    lines = reply.split("\r\n")
    for i, line in enumerate(lines):
        if line.startswith("VALUE "):
            out[line.split()[1]] = lines[i + 1]
    return out


@pytest.mark.parametrize("how", ["dump", "predump+incremental"])
def test_memcached_serves_every_key_after_restore(harness: Harness, how: str) -> None:
    proc, port = start_memcached(harness)
    pairs = [(f"k{i}", f"v{i}-" + "y" * (i % 50)) for i in range(KEYS)]
    for n in range(0, KEYS, 50):  # several connections: several worker threads
        mc_set("127.0.0.1" if n % 100 else "::1", port, pairs[n:n + 50])
    threads = len(thread_ids(proc.pid))

    def between() -> None:
        mc_set("127.0.0.1", port, [("late", "between passes")])

    images = dump_daemon(harness, proc, how, between)
    pid = harness.restore_detached(images)
    want = dict(pairs)
    for host in ("127.0.0.1", "::1"):
        assert mc_get(host, port, list(want)) == want
    mc_set("::1", port, [("after", "restore")])
    assert mc_get("127.0.0.1", port, ["after"]) == {"after": "restore"}
    if how != "dump":
        assert mc_get("::1", port, ["late"]) == {"late": "between passes"}
    assert len(thread_ids(pid)) == threads
