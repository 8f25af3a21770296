"""What a real server's fds cost a dump and a restore: redis-server holding --size-mib of
keys (a pipe to itself, an epoll set, IPv4 and IPv6 listeners, 5 threads).

As root, with ckpt installed and redis-server on PATH (.ci/run installs it):

    python bench/redis_fds.py                      # 1 GiB of keys
    python bench/redis_fds.py --size-mib 256

Prints, for one dump and one restore of the same process, the whole time next to the part
spent on fds (in the dump, while frozen: the check ckpt.collect.target.read_target and
ckpt.collect.files.collect_files, which share their reads; in the restore,
ckpt.restore.files.restore_files), so the fds' share is measured against the same
process's memory dump; then the stall a client sees: the longest PING round trip on one connection
during a --leave-running --tcp-close dump (the process keeps running and its connection
stays up). The restored redis must hold every key: DBSIZE and a sample are checked.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ckpt.actions.dump as dump_mod
import ckpt.restore.process as process_mod
from ckpt.actions.dump import DumpOptions, dump
from ckpt.actions.restore import RestoreOptions, restore
from ckpt.images import ImageDir

MIB = 1 << 20
VALUE = 1000  # bytes per key


def line(name: str, text: str) -> None:
    print(f"{name:<28} {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def command(port: int, *args: str, timeout: float = 600) -> bytes:
    """One RESP command on a new connection; the raw reply."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a)}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(1 << 16)


@contextmanager
def timed(owner: Any, name: str, into: list[float]) -> Iterator[None]:
    """Time every call of ``owner.name`` (ms) for the duration of the block."""
    orig = getattr(owner, name)

    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig(*a, **kw)
        finally:
            into.append((time.perf_counter() - t) * 1000)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, orig)


#: A client in its own process (in ckpt's, the dump's threads would delay it): PINGs on one
#: connection until stdin closes, then prints its longest and median round trips (ms).
PINGER = """
import socket, sys, threading, time
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
gaps, done = [], threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
print("ready", flush=True)
while not done.is_set():
    t = time.perf_counter()
    sock.sendall(b"*1\\r\\n$4\\r\\nPING\\r\\n")
    assert sock.recv(64) == b"+PONG\\r\\n"
    gaps.append((time.perf_counter() - t) * 1000)
    time.sleep(0.001)
print(max(gaps), sorted(gaps)[len(gaps) // 2])
"""


def client_stall(port: int, during: Callable[[], object]) -> tuple[float, float]:
    """The longest and the median PING round trip a separate client sees during
    ``during()``."""
    client = subprocess.Popen([sys.executable, "-c", PINGER, str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    try:
        if client.stdout.readline().strip() != "ready":
            raise SystemExit("the PING client did not start")
        time.sleep(0.3)
        during()
        time.sleep(0.3)
        out, _ = client.communicate(timeout=30)
    finally:
        client.kill()
        client.wait()
    longest, median = out.split()
    return float(longest), float(median)


def run(args: argparse.Namespace, work: Path, pids: list[int]) -> None:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    server = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1 ::1", "--save", "",
         "--appendonly", "no", "--dir", str(work), "--enable-debug-command", "yes"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    pids.append(server.pid)
    deadline = time.monotonic() + 30
    while True:
        try:
            if command(port, "PING") == b"+PONG\r\n":
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("redis-server did not start")
        time.sleep(0.05)
    keys = args.size_mib * MIB // (VALUE + 100)  # ~100 bytes of overhead per key
    t0 = time.perf_counter()
    command(port, "DEBUG", "POPULATE", str(keys), "key", str(VALUE))
    rss = int(next(x for x in Path(f"/proc/{server.pid}/status").read_text().splitlines()
                   if x.startswith("VmRSS")).split()[1]) * 1024
    line("target", f"redis pid {server.pid}, {keys} keys, RSS {rss / MIB:.0f} MiB, filled in "
         f"{time.perf_counter() - t0:.1f} s, {len(os.listdir(f'/proc/{server.pid}/fd'))} fds")

    # the stall a client sees: --leave-running, its connection kept (--tcp-close accepts it)
    lr = work / "leave-running"
    longest, typical = client_stall(port, lambda: dump(DumpOptions(
        pid=server.pid, images_dir=str(lr), leave_running=True, tcp_close=True)))
    stats = ImageDir.open(lr).read_inventory().stats
    line("stall seen by a client", f"{longest:.1f} ms longest PING round trip (typical "
         f"{typical:.2f} ms); ckpt's frozen figure {stats.frozen_ms:.1f} ms")
    shutil.rmtree(lr)

    images = work / "images"
    collect_ms: list[float] = []
    check_ms: list[float] = []  # the preflight's, then the frozen check's
    t1 = time.perf_counter()
    with timed(dump_mod, "collect_files", collect_ms), timed(dump_mod, "read_target",
                                                             check_ms):
        dump(DumpOptions(pid=server.pid, images_dir=str(images)))
    dump_ms = (time.perf_counter() - t1) * 1000
    files_ms = [check_ms[-1], *collect_ms]  # both while frozen; they share their reads
    server.wait()
    stats = ImageDir.open(images).read_inventory().stats
    line("dump total", f"{dump_ms:.0f} ms (frozen {stats.frozen_ms:.0f} ms, memory copy "
         f"{stats.copy_ms:.0f} ms, {stats.bytes_written / MIB:.0f} MiB stored)")
    line("dump fds", f"{sum(files_ms):.2f} ms = {sum(files_ms) / dump_ms * 100:.2f} % of the "
         f"dump (frozen check {check_ms[-1]:.2f} ms, collection {sum(collect_ms):.2f} ms)")

    restore_files_ms: list[float] = []
    with timed(process_mod, "restore_files", restore_files_ms):
        res = restore(RestoreOptions(images_dir=str(images)))
    pids.append(res.pid)
    line("restore total", f"{res.total_ms:.0f} ms")
    line("restore fds", f"{sum(restore_files_ms):.2f} ms = "
         f"{sum(restore_files_ms) / res.total_ms * 100:.2f} % of the restore")
    size = command(port, "DBSIZE")
    sample = command(port, "GET", f"key:{keys // 2}")
    ok = size == f":{keys}\r\n".encode() and sample.startswith(f"${VALUE}\r\n".encode())
    line("verify", f"{'ok' if ok else 'FAILED'}: DBSIZE {size.strip().decode()}")
    line("summary", f"fds cost {sum(files_ms):.1f} ms of a {dump_ms:.0f} ms dump and "
         f"{sum(restore_files_ms):.1f} ms of a {res.total_ms:.0f} ms restore")
    if not ok:
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="keys to hold (MiB)")
    ap.add_argument("--tmp", default=None, help="parent of the temp dir (default: $TMPDIR)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-redis-", dir=args.tmp))
    pids: list[int] = []
    try:
        run(args, work, pids)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
