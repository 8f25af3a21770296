"""Dump/restore benchmark: one big-memory process, raw copy reference, dump, restore, verify.

    python bench/dump_restore.py [--size-mib 1024] [--compress-level N] [--seed S]

Run as root from the repository (ckpt importable). Steps, all in one run:

    target     a Python process holding SIZE of anonymous memory, page mix: zero pages,
               random pages, low-entropy text pages (deterministic seed); it writes
               "addr size sha256" to a status file once filled, and on SIGUSR1 writes the
               sha256 of the same memory to a verify file
    raw        process_vm_readv of the pages ckpt would dump, 4 MiB at a time into one
               reused buffer: the bandwidth ceiling for the dump's copy (best of 3)
    dump -R    ckpt.actions.dump.dump with leave_running: the frozen time, in which the
               pages are only read into memory (compressed and stored after the thaw)
    dump       ckpt.actions.dump.dump (kills the target): wall, frozen and copy time,
               image size, compression ratio, copy bandwidth relative to raw (the
               dump's frozen/copy/total times and sizes as recorded in inventory.img)
    raw write  the image's size of incompressible data written to a file next to the
               images (4 MiB writes): what this filesystem and page cache take, the
               other ceiling of the dump's copy
    raw fill   process_vm_writev of the dumped bytes into fresh anonymous memory, 4 MiB
               per call: each page faulted in, zeroed, then copied over. Restore fills
               anonymous memory with UFFDIO_COPY instead, which skips the zeroing, so it
               can beat this reference (restore / raw fill < 1 once decompression hides)
    restore    ckpt.actions.restore.restore (detached), then SIGUSR1 to the restored
               process and compare its memory checksum with the original
    command    the same images restored again by `ckpt restore -d` in a fresh process:
               the wall time a user sees, Python start-up and imports included

Every process started here is killed and every temp dir removed, on any exit.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt.actions.dump import DumpOptions, dump
from ckpt.actions.restore import RestoreOptions, restore
from ckpt.collect.vmas import collect_vmas
from ckpt.images import ImageDir
from ckpt.kernel.sys import kill_and_reap, vm_transfer
from ckpt.pagecopy.copy import batches
from ckpt.pagecopy.plan import Run, plan_dump
from ckpt.restore import process as restore_mod  # where restore() calls fill_pages
from ckpt.restore.pages import fill_pages

MIB = 1 << 20
RAW_CHUNK = 4 * MIB
MAP_POPULATE = 0x8000
GOAL_DUMP_RATIO = 0.5
GOAL_RESTORE_S_PER_GIB = 0.6

# The target: argv = size seed status_path verify_path. Kept dependency-free and fast:
# one 64 MiB pattern is built per page kind, then copied over the whole mapping, and
# every non-zero page gets its index stamped in so repeats are not identical.
TARGET = r'''
import ctypes, hashlib, mmap, os, random, signal, struct, sys
size, seed, status, verify = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
PAGE, PAT = 4096, min(64 << 20, size)
rng = random.Random(seed)
lvl, who = (b"INFO", b"DEBUG", b"WARN", b"ERROR"), (b"http", b"db.pool", b"cache", b"auth")
msg = (b"request served", b"connection acquired", b"cache miss for key", b"job done in",
       b"token refreshed for user", b"retrying after", b"queue depth")
text = b"".join(b"2025-11-%02d %02d:%02d:%02d.%03d %s [%s] %s %d\n" % (
    rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59),
    rng.randint(0, 999), rng.choice(lvl), rng.choice(who), rng.choice(msg),
    rng.randint(0, 99999)) for _ in range(40000))
rand = rng.randbytes(PAT)
pat = bytearray(PAT)
kinds = []
for i in range(PAT // PAGE):
    o, r = i * PAGE, rng.random()
    if r < 0.2:
        kinds.append(0)                       # zero page (present, all zeros)
    elif r < 0.6:
        kinds.append(1)
        pat[o:o + PAGE] = rand[o:o + PAGE]    # incompressible
    else:
        kinds.append(2)
        s = rng.randrange(len(text) - PAGE)
        pat[o:o + PAGE] = text[s:s + PAGE]    # text-like, low entropy
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, size, PAT):
    n = min(PAT, size - off)
    m[off:off + n] = pat[:n]
npat, pack = PAT // PAGE, struct.Struct("<Q").pack_into
for i in range(PAT // PAGE, size // PAGE):
    if kinds[i % npat]:
        pack(m, i * PAGE + (i * 8) % PAGE, i)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
del pat, rand, text

def publish(path, line):
    with open(path + ".tmp", "w") as f:
        f.write(line)
    os.rename(path + ".tmp", path)

publish(status, f"{addr:x} {size} {hashlib.sha256(m).hexdigest()}\n")
asked = [0]

def on_usr1(signo, frame):
    asked[0] += 1
    publish(verify, f"{asked[0]} {hashlib.sha256(m).hexdigest()}\n")

signal.signal(signal.SIGUSR1, on_usr1)
while True:
    signal.pause()
'''


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def line(name: str, value: str) -> None:
    print(f"{name:<28} {value}", flush=True)


def wait_file(path: Path, alive: Callable[[], bool], timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            return path.read_text()
        if not alive():
            raise SystemExit(f"bench: {what}: the process died")
        time.sleep(0.01)
    raise SystemExit(f"bench: {what}: no answer within {timeout:.0f} s")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def raw_read(pid: int, runs: list[Run]) -> float:
    """Seconds to process_vm_readv every run, 4 MiB per call into one reused buffer."""
    buf = mmap.mmap(-1, RAW_CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    chunks = list(batches(runs, RAW_CHUNK))
    t0 = time.perf_counter()
    for batch in chunks:
        pairs, off = [], 0
        for addr, length in batch:
            pairs.append((base + off, addr, length))
            off += length
        vm_transfer(False, pid, pairs)
    return time.perf_counter() - t0


def raw_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` of incompressible data to a new file at ``path``."""
    block = os.urandom(RAW_CHUNK)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for at in range(0, nbytes, RAW_CHUNK):
            f.write(block[: min(RAW_CHUNK, nbytes - at)])
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def raw_fill(nbytes: int) -> float:
    """Seconds to process_vm_writev ``nbytes`` into fresh anonymous memory (our own)."""
    src = mmap.mmap(-1, RAW_CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE)
    src.write(os.urandom(RAW_CHUNK))
    dst = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    s_obj, d_obj = ctypes.c_char.from_buffer(src), ctypes.c_char.from_buffer(dst)
    s, d = ctypes.addressof(s_obj), ctypes.addressof(d_obj)
    t0 = time.perf_counter()
    for at in range(0, nbytes, RAW_CHUNK):
        vm_transfer(True, os.getpid(), [(s, d + at, min(RAW_CHUNK, nbytes - at))])
    seconds = time.perf_counter() - t0
    del s_obj, d_obj  # the exports, so that the maps can close
    src.close()
    dst.close()
    return seconds


def cli_restore(images: Path, pidfile: Path, pids: list[int]) -> float:
    """Wall seconds of the `ckpt restore` command (detached), the way a user runs it; the
    restored process is killed again."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", "from ckpt.cli import run; run()", "restore",
                          "-D", str(images),
                          "--restore-detached", "--pidfile", str(pidfile)],
                         capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int(pidfile.read_text())
        pids.append(pid)
        kill_and_reap(pid)
        pids.remove(pid)
    if res.returncode:
        raise SystemExit(f"bench: ckpt restore failed: {res.stderr.strip()}")
    return seconds


def cpu_s() -> float:
    """User + system CPU seconds of this process so far, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def run(args: argparse.Namespace, work: Path, pids: list[int]) -> dict[str, float]:
    size = args.size_mib * MIB
    status, verify = work / "status", work / "verify"
    t0 = time.perf_counter()
    target = subprocess.Popen(
        [sys.executable, "-c", TARGET, str(size), str(args.seed), str(status), str(verify)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        close_fds=True, start_new_session=True)
    pids.append(target.pid)
    addr_hex, _, want_sum = wait_file(status, lambda: target.poll() is None, 300,
                                      "target fill").split()
    line("target", f"pid {target.pid}, {args.size_mib} MiB at {int(addr_hex, 16):#x}, "
         f"filled in {time.perf_counter() - t0:.2f} s")

    runs = plan_dump(target.pid, collect_vmas(target.pid))
    raw_bytes = sum(r.length for r in runs)
    raw_s = min(raw_read(target.pid, runs) for _ in range(3))
    raw_bw = gbps(raw_bytes, raw_s)
    line("raw bytes", f"{raw_bytes} ({raw_bytes / MIB:.1f} MiB in {len(runs)} runs)")
    line("raw readv", f"{raw_s * 1000:.1f} ms  {raw_bw:.2f} GB/s")

    # --leave-running: the freeze only reads the pages into memory reserved beforehand
    running = work / "images-leave-running"
    dump(DumpOptions(pid=target.pid, images_dir=str(running), leave_running=True,
                     compress_level=args.compress_level))
    lr = ImageDir.open(running).read_inventory().stats
    lr_bw = gbps(lr.pages_written * 4096, lr.frozen_ms / 1000)
    line("dump -R frozen", f"{lr.frozen_ms:.1f} ms  {lr_bw:.2f} GB/s = "
         f"{lr_bw / raw_bw * 100:.0f} % of raw readv (--leave-running: pages read into "
         f"memory, stored after the thaw in {lr.copy_ms:.0f} ms)")
    shutil.rmtree(running)

    images = work / "images"
    t1, c1 = time.perf_counter(), cpu_s()
    dump(DumpOptions(pid=target.pid, images_dir=str(images), compress_level=args.compress_level))
    dump_wall, dump_cpu = time.perf_counter() - t1, cpu_s() - c1
    target.wait()  # dump killed it; reap so its pid is free for the restore
    pids.remove(target.pid)
    # the dump's own numbers (what DumpResult reports), as recorded in inventory.img
    res = ImageDir.open(images).read_inventory().stats
    dumped = res.pages_written * 4096
    copy_bw = gbps(dumped, res.copy_ms / 1000)
    image = dir_bytes(images)
    line("dump wall", f"{dump_wall * 1000:.1f} ms  ({res.total_ms:.1f} ms inside dump)")
    line("dump frozen", f"{res.frozen_ms:.1f} ms")
    line("dump cpu", f"{dump_cpu * 1000:.0f} ms (user+sys, all threads of ckpt)")
    line("dump copy", f"{res.copy_ms:.1f} ms  {copy_bw:.2f} GB/s")
    line("dump pages bytes", f"{res.bytes_written} ({res.bytes_written / MIB:.1f} MiB)")
    line("image dir bytes", f"{image} ({image / MIB:.1f} MiB)")
    line("compression ratio", f"{dumped / res.bytes_written:.2f}  (level {args.compress_level})")
    line("dump copy / raw", f"{copy_bw / raw_bw * 100:.0f} %  (goal >= 50 %)")
    write_s = raw_write(work / "raw-write", res.bytes_written)
    line("raw write", f"{write_s * 1000:.1f} ms for the image's {res.bytes_written / MIB:.0f} "
         f"MiB ({gbps(res.bytes_written, write_s):.2f} GB/s); dump copy / raw write "
         f"{write_s / (res.copy_ms / 1000) * 100:.0f} %")
    fill_ref = raw_fill(dumped)
    line("raw fill", f"{fill_ref * 1000:.1f} ms  {gbps(dumped, fill_ref):.2f} GB/s "
         "(writev into fresh memory)")

    fill_s = [0.0]
    real_fill = fill_pages

    def timed_fill(*a: Any, **kw: Any) -> int:
        t = time.perf_counter()
        try:
            return real_fill(*a, **kw)
        finally:
            fill_s[0] += time.perf_counter() - t

    setattr(restore_mod, "fill_pages", timed_fill)  # noqa: B010 - time the page fill alone
    try:
        t2, c2 = time.perf_counter(), cpu_s()
        rres = restore(RestoreOptions(images_dir=str(images)))
        restore_wall, restore_cpu = time.perf_counter() - t2, cpu_s() - c2
    finally:
        setattr(restore_mod, "fill_pages", real_fill)  # noqa: B010
    pids.append(rres.pid)
    restore_s = rres.total_ms / 1000
    goal_s = GOAL_RESTORE_S_PER_GIB * size / (1 << 30)
    line("restore total", f"{rres.total_ms:.1f} ms  {gbps(dumped, restore_s):.2f} GB/s "
         f"(wall {restore_wall * 1000:.1f} ms; goal < {goal_s:.2f} s)")
    line("restore cpu", f"{restore_cpu * 1000:.0f} ms (user+sys, all threads of ckpt)")
    line("restore fill_pages", f"{fill_s[0] * 1000:.1f} ms  {gbps(dumped, fill_s[0]):.2f} GB/s")
    line("restore / raw fill", f"{restore_s / fill_ref:.2f}")

    t3 = time.perf_counter()
    os.kill(rres.pid, signal.SIGUSR1)
    _, got_sum = wait_file(verify, lambda: pid_alive(rres.pid), 120,
                           "restored checksum").split()
    ok = got_sum == want_sum
    line("verify", f"{'OK' if ok else 'MISMATCH'} sha256 {got_sum[:16]}... "
         f"({(time.perf_counter() - t3) * 1000:.0f} ms, pid {rres.pid})")
    kill_and_reap(rres.pid)
    pids.remove(rres.pid)
    if not ok:
        raise SystemExit(f"bench: restored memory differs: {got_sum} != {want_sum}")
    cli_s = cli_restore(images, work / "cli.pid", pids)
    line("ckpt restore (command)", f"{cli_s * 1000:.1f} ms wall: a fresh `ckpt restore -d`, "
         "Python start-up and imports included")
    return {"raw_bw": raw_bw, "copy_bw": copy_bw, "ratio": dumped / res.bytes_written,
            "frozen_s": res.frozen_ms / 1000, "restore_s": restore_s, "cli_s": cli_s,
            "dump_cpu_s": dump_cpu,
            "restore_cpu_s": restore_cpu, "write_s": write_s, "fill_s": fill_ref}


def on_sigterm(signo: int, frame: object) -> None:
    raise KeyboardInterrupt  # clean up as on Ctrl-C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="target memory (MiB)")
    ap.add_argument("--compress-level", type=int, default=DumpOptions.compress_level,
                    help="zstd level for the dump (default: the DumpOptions default)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the memory contents")
    ap.add_argument("--runs", type=int, default=1, help="repeat the whole cycle; best of N")
    ap.add_argument("--tmp", default=None, help="parent of the temp dir (default: $TMPDIR)")
    args = ap.parse_args()
    if args.size_mib <= 0 or args.runs <= 0:
        ap.error("--size-mib and --runs must be positive")
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (ptrace, process_vm_readv)")
    signal.signal(signal.SIGTERM, on_sigterm)
    results = []
    for i in range(args.runs):
        if args.runs > 1:
            print(f"-- run {i + 1}/{args.runs} (load average {os.getloadavg()[0]:.2f}) --")
        work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.tmp))
        pids: list[int] = []
        try:
            results.append(run(args, work, pids))
        finally:
            for pid in pids:
                kill_and_reap(pid)
            shutil.rmtree(work, ignore_errors=True)
    best = {k: min(r[k] for r in results) for k in results[0]}
    best.update({k: max(r[k] for r in results) for k in ("raw_bw", "copy_bw")})
    goal_s = GOAL_RESTORE_S_PER_GIB * args.size_mib / 1024
    ratio = best["copy_bw"] / best["raw_bw"]
    print(f"-- summary ({'best of ' + str(args.runs) if args.runs > 1 else '1 run'}) --")
    line("dump copy / raw readv", f"{ratio:.2f}  "
         f"({'meets' if ratio >= GOAL_DUMP_RATIO else 'misses'} goal >= {GOAL_DUMP_RATIO:.2f})")
    line("restore time / goal", f"{best['restore_s'] / goal_s:.2f}  ({best['restore_s']:.3f} s, "
         f"{'meets' if best['restore_s'] < goal_s else 'misses'} goal < {goal_s:.2f} s; the "
         f"command: {best['cli_s']:.3f} s)")
    line("compression ratio", f"{best['ratio']:.2f}")
    line("dump frozen", f"{best['frozen_s'] * 1000:.0f} ms")
    line("dump / restore cpu", f"{best['dump_cpu_s'] * 1000:.0f} ms / "
         f"{best['restore_cpu_s'] * 1000:.0f} ms")
    line("raw write / raw fill", f"{best['write_s'] * 1000:.0f} ms / {best['fill_s'] * 1000:.0f} ms"
         " (what this machine's page cache and fresh memory cost, whatever ckpt does)")

if __name__ == "__main__":
    main()
