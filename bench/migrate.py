"""Migration benchmark: a target of SIZE MiB that dirties ~10 MB/s, moved across a veth
link between two network namespaces. Prints total time, rounds, downtime, bytes on the
wire against the memory size, and the raw link throughput measured in the same run.

    sudo python bench/migrate.py [--size-mib 1024] [--dirty-mb-s 10] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NS_A, NS_B, ADDR_B, PORT = "ckbenchA", "ckbenchB", "10.79.0.2", 27001

TARGET = r"""
import mmap, os, sys, time
size, rate = int(sys.argv[1]) << 20, float(sys.argv[2]) * 1e6
mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
block = os.urandom(1 << 20)
for off in range(0, size, len(block)):
    mem[off:off + len(block)] = block
pages, step, n = size // 4096, max(1, int(rate / 4096 / 20)), 0
print("ready", flush=True)
while True:
    for k in range(step):
        p = (n * 7919 + k * 104729) % pages
        mem[p * 4096:p * 4096 + 8] = n.to_bytes(8, "little")
    n += 1
    time.sleep(0.05)
"""


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def setup_net() -> None:
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", "ckbench-a", "type", "veth", "peer", "name", "ckbench-b")
    sh("ip", "link", "set", "ckbench-a", "netns", NS_A)
    sh("ip", "link", "set", "ckbench-b", "netns", NS_B)
    sh("ip", "-n", NS_A, "addr", "add", "10.79.0.1/24", "dev", "ckbench-a")
    sh("ip", "-n", NS_B, "addr", "add", f"{ADDR_B}/24", "dev", "ckbench-b")
    for ns, dev in ((NS_A, "ckbench-a"), (NS_B, "ckbench-b")):
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def raw_link_mb_s(size: int = 256 << 20) -> float:
    """Plain TCP throughput A -> B over the same veth (a sink in B, a source in A)."""
    sink = subprocess.Popen(["ip", "netns", "exec", NS_B, sys.executable, "-c",
                             f"import socket; s = socket.create_server(('{ADDR_B}', 27999)); "
                             "c, _ = s.accept()\nwhile c.recv(1 << 20): pass"])
    time.sleep(0.5)
    code = (f"import socket, time; s = socket.create_connection(('{ADDR_B}', 27999)); "
            "b = bytes(1 << 20); t = time.perf_counter()\n"
            f"for _ in range({size >> 20}): s.sendall(b)\n"
            "s.close(); print(time.perf_counter() - t)")
    out = subprocess.run(["ip", "netns", "exec", NS_A, sys.executable, "-c", code],
                         capture_output=True, text=True, check=True).stdout
    sink.wait(timeout=30)
    return size / float(out) / 1e6


def migrate_once(args: argparse.Namespace, work: Path, procs: list[subprocess.Popen[bytes]],
                 ) -> dict[str, Any]:
    """Start a target in A, migrate it to B, kill the copy; the migrate --json summary."""
    out = open(work / "target.out", "w")  # noqa: SIM115
    target = subprocess.Popen(["ip", "netns", "exec", NS_A, sys.executable, "-c", TARGET,
                               str(args.size_mib), str(args.dirty_mb_s)],
                              stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, close_fds=True,
                              start_new_session=True)
    procs.append(target)
    while "ready" not in (work / "target.out").read_text():
        time.sleep(0.2)
    time.sleep(1.0)
    res = subprocess.run(["ip", "netns", "exec", NS_A, "ckpt", "migrate", "-t",
                          str(target.pid), "--to", f"{ADDR_B}:{PORT}", "--auth-token-file",
                          str(work / "token"), "--json"], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"migrate failed: {res.stderr.strip()}")
    s: dict[str, Any] = json.loads(res.stdout)
    target.wait(timeout=30)
    os.kill(int(s["pid"]), 9)
    return s


def report(s: dict[str, Any], args: argparse.Namespace, link: float) -> None:
    size = args.size_mib << 20
    for r in s["per_round"]:
        print(f"round {r['round']:<3}                {r['dirty_pages']} dirty pages, "
              f"{r['bytes'] / 2**20:.1f} MiB, {r['seconds'] * 1000:.0f} ms")
    print(f"total time               {s['total_s']:.2f} s ({s['rounds']} rounds; "
          f"{s['stop_reason']})")
    print(f"frozen on the source     {s['frozen_ms']:.1f} ms")
    print(f"restore on destination   {s['restore_ms']:.1f} ms"
          f"{' (warm)' if s.get('restore_warm') else ''}")
    print(f"downtime                 {s['downtime_ms']:.1f} ms (goal <= 50 ms)")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in s.get("downtime_parts_ms", {}).items())
    print(f"  of which (ms)           {parts}")
    print(f"bytes on the wire        {s['bytes'] / 2**20:.1f} MiB = "
          f"{s['bytes'] / size:.2f}x the memory")
    print(f"pre-copy vs raw link     {s['bytes'] / 1e6 / s['total_s'] / link:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dirty-mb-s", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=3, help="migrations (the machine is noisy)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-migrate-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        setup_net()
        link = raw_link_mb_s()
        print(f"raw link                 {link:.0f} MB/s (TCP over the veth, same run)")
        print(f"target                   {args.size_mib} MiB, dirtying ~{args.dirty_mb_s} MB/s")
        (work / "token").write_text("bench\n")
        server = subprocess.Popen(["ip", "netns", "exec", NS_B, "ckpt", "page-server",
                                   "--address", ADDR_B, "--port", str(PORT), "-D",
                                   str(work / "in"), "--auth-token-file", str(work / "token")],
                                  stderr=subprocess.DEVNULL)
        procs.append(server)
        downtimes = []
        for run in range(1, args.runs + 1):
            print(f"-- run {run}")
            s = migrate_once(args, work, procs)
            report(s, args, link)
            downtimes.append(s["downtime_ms"])
        print(f"-- downtime over {len(downtimes)} runs: median "
              f"{statistics.median(downtimes):.1f} ms, min {min(downtimes):.1f}, max "
              f"{max(downtimes):.1f} (goal <= 50 ms)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in (NS_A, NS_B):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
