"""Incremental benchmark: predump, then dirty a known fraction of pages, then
``dump --incremental --leave-running``; frozen time against a raw reference.

    python bench/incremental.py [--sizes-mib 1024,4096] [--percents 0.1,1,10]

Run as root from the repository (ckpt importable). For every size (a size is skipped,
with a message, if /proc/meminfo MemAvailable cannot hold it):

    target     the memory target of bench/dump_restore.py (SIZE of anonymous memory:
               zero, random and text-like pages, deterministic seed); here, on SIGUSR1
               it reads a list of page indices from a request file, writes one byte in
               each of those pages, and answers "round count" in a done file
    round      for each dirty fraction (and, for sizes above the smallest, a fixed page
               count equal to 1 % of the smallest size: same dirty pages, more memory):
                 predump      a fresh predump (first pass: arms uffd-wp, copies all)
                 dirty        exactly k random distinct pages (seeded), via the target
                 raw          one plain PAGEMAP_SCAN (no WP) of the whole address space
                              + process_vm_readv of exactly the k pages (best of 3)
                 dump         ckpt.actions.dump.dump(incremental, leave_running) with
                              the predump as parent; stats from inventory.img. It
                              pre-copies: the dirtied pages are read before the freeze
                 no-precopy   again a fresh predump, the same pages dirtied, and the dump
                              with precopy=False: every dirtied page read while frozen
                              (what a target rewriting all of them during the pre-copy
                              would cost); --precopy-only skips it
               with --repeat N both dumps are taken N times (a fresh predump each time)
               and the median frozen time is reported
               each dump is checked: every dirtied page is PRESENT in its pagemap
    breakdown  ckpt's functions are wrapped with timers (from this process, for the
               duration of each ckpt call only), so the frozen window of the dump and of
               the predump is split into phases (nothing in ckpt/ is changed)

Every process started here is killed and every temp dir removed, on any exit.
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dump_restore as dr
from phases import Phases

import ckpt.collect.vmas as vmas_mod
import ckpt.kernel.pagemap as pm
import ckpt.pagecopy.plan as plan_mod
from ckpt.actions.dump import DumpOptions, dump
from ckpt.actions.predump import PredumpOptions, predump
from ckpt.images import ImageDir
from ckpt.images.pb import image_pb2
from ckpt.kernel.sys import kill_and_reap
from ckpt.pagecopy.plan import Run

MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096
USER_SPACE_END = (1 << 47) - PAGE
GOAL_PREDUMP_FROZEN_MS_PER_GIB = 20.0  # first predump, 1 GiB
GOAL_DUMP_FROZEN_MS_1PCT = 15.0  # incremental dump at 1 %, 1 GiB
RAW_REPEAT = 3

# The target of bench/dump_restore.py up to its SIGUSR1 handler (fill + status), then
# our own handler: dirty the pages listed in the request file.
_MARK = "asked = [0]"
if _MARK not in dr.TARGET:
    raise SystemExit("bench: bench/dump_restore.py's TARGET changed; update incremental.py")
TARGET = dr.TARGET.split(_MARK)[0] + r'''
from array import array
request, done = sys.argv[5], sys.argv[6]

def on_usr1(signo, frame):
    with open(request, "rb") as f:
        data = f.read()
    rnd = struct.unpack_from("<Q", data)[0]
    idx = array("I")
    idx.frombytes(data[8:])
    off = 64 + (rnd * 8) % (PAGE - 128)
    for i in idx:
        o = i * PAGE + off
        m[o] = m[o] ^ 0xFF          # one byte per page: the page reads WRITTEN
    publish(done, f"{rnd} {len(idx)}\n")

signal.signal(signal.SIGUSR1, on_usr1)
while True:
    signal.pause()
'''

line = dr.line


# ---------------------------------------------------------------------------- helpers

def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for row in f:
            if row.startswith("MemAvailable:"):
                return int(row.split()[1]) * 1024
    return 0


def stats_of(path: Path) -> image_pb2.DumpStats:
    return ImageDir.open(path).read_inventory().stats


def present_ranges(path: Path, pid: int) -> list[tuple[int, int]]:
    _, pagemap = ImageDir.open(path).read_pagemap(pid)
    return pagemap.present


def covered(ranges: list[tuple[int, int]], addrs: list[int]) -> int:
    starts = [s for s, _ in ranges]
    n = 0
    for a in addrs:
        i = bisect.bisect_right(starts, a) - 1
        if i >= 0 and ranges[i][0] <= a < ranges[i][1]:
            n += 1
    return n


def page_runs(addrs: list[int]) -> list[Run]:
    """Adjacent pages merged into runs, as ckpt's plan would merge them."""
    runs: list[Run] = []
    for a in sorted(addrs):
        if runs and runs[-1].vaddr + runs[-1].length == a:
            runs[-1] = Run(runs[-1].vaddr, runs[-1].length + PAGE)
        else:
            runs.append(Run(a, PAGE))
    return runs


def timed_scan(pid: int, **kw: Any) -> tuple[float, int]:
    """Best-of-3 ms of one PAGEMAP_SCAN over the whole address space; regions found."""
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    vec = pm.new_scan_vec()
    try:
        best, regions = float("inf"), 0
        for _ in range(RAW_REPEAT):
            t = time.perf_counter()
            regions = len(pm.pagemap_scan(fd, 0, USER_SPACE_END, vec=vec, **kw))
            best = min(best, (time.perf_counter() - t) * 1000)
        return best, regions
    finally:
        os.close(fd)


@dataclass
class Round:
    label: str
    pages: int
    predump_frozen: float = 0.0
    predump_total: float = 0.0
    frozen: float = 0.0
    total: float = 0.0
    written: int = 0
    in_parent: int = 0
    bytes_written: int = 0
    scan_ms: float = 0.0
    readv_ms: float = 0.0
    present_scan_ms: float = 0.0
    existing_ms: float = 0.0  # existing_pages inside the dump's frozen window
    pread_all_ms: float = 0.0  # existing_pages over every VMA (whole pread), target running
    frozen_cpu: float = 0.0
    copy_ms: float = 0.0
    plain_frozen: float = 0.0  # the same round with --no-precopy: every page read frozen


class Target:
    def __init__(self, work: Path, size: int, seed: int, pids: list[int]) -> None:
        self.work, self.size = work, size
        self.status, self.request, self.done = (work / "status", work / "request",
                                                work / "done")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TARGET, str(size), str(seed), str(self.status),
             str(work / "verify"), str(self.request), str(self.done)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=True, start_new_session=True)
        self.pid = self.proc.pid
        pids.append(self.pid)
        addr_hex, _, _ = dr.wait_file(self.status, self.alive, 600, "target fill").split()
        self.addr = int(addr_hex, 16)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def dirty(self, rnd: int, pages: list[int]) -> float:
        """Have the target write one byte in each page; seconds until it says done."""
        self.done.unlink(missing_ok=True)
        tmp = self.request.with_suffix(".tmp")
        tmp.write_bytes(rnd.to_bytes(8, "little") + array("I", pages).tobytes())
        os.rename(tmp, self.request)
        t = time.perf_counter()
        os.kill(self.pid, signal.SIGUSR1)
        got = dr.wait_file(self.done, self.alive, 120, "dirty pages").split()
        if got != [str(rnd), str(len(pages))]:
            raise SystemExit(f"bench: target answered {got}, expected {rnd} {len(pages)}")
        return time.perf_counter() - t


# ---------------------------------------------------------------------------- one size

def run_size(args: argparse.Namespace, size_mib: int, work: Path, pids: list[int],
             fixed_pages: int | None) -> list[Round]:
    size = size_mib * MIB
    npages = size // PAGE
    t0 = time.perf_counter()
    target = Target(work, size, args.seed, pids)
    print(f"== {size_mib} MiB: target pid {target.pid}, filled in "
          f"{time.perf_counter() - t0:.1f} s ==", flush=True)
    presets = [(f"{p:g} %", max(1, round(npages * p / 100))) for p in args.percents]
    if fixed_pages is not None and fixed_pages not in [k for _, k in presets]:
        presets.append((f"{fixed_pages} pages", fixed_pages))
    rounds: list[Round] = []
    for rnd, (label, k) in enumerate(presets, 1):
        r = Round(label, k)
        pre_dir, dump_dir = work / f"pre-{rnd}", work / f"dump-{rnd}"
        # (1) a fresh predump: the parent of this round's dump
        ph = Phases()
        t = time.perf_counter()
        with ph.installed():
            predump(PredumpOptions(pid=target.pid, images_dir=str(pre_dir),
                                   compress_level=args.compress_level))
        wall = (time.perf_counter() - t) * 1000
        ps = stats_of(pre_dir)
        r.predump_frozen, r.predump_total = ps.frozen_ms, ps.total_ms
        line(f"[{label}] predump", f"frozen {ps.frozen_ms:.2f} ms, total {ps.total_ms:.0f} ms "
             f"(wall {wall:.0f}), {ps.pages_written} pages, "
             f"{ps.bytes_written / MIB:.1f} MiB stored")
        if rnd == 1 and not args.quiet_breakdown:
            ph.report("the first predump", ps.frozen_ms)
        # (2) dirty exactly k distinct random pages
        rng = random.Random(args.seed * 1_000_003 + size_mib * 1009 + rnd)
        idx = rng.sample(range(npages), k)
        addrs = [target.addr + i * PAGE for i in idx]
        dirty_s = target.dirty(rnd, idx)
        # (3) raw reference, the same pages, the target running (reads set no WRITTEN bit)
        r.scan_ms, regions = timed_scan(target.pid, category_mask=pm.PAGE_IS_WRITTEN,
                                        return_mask=pm.PAGE_IS_WRITTEN)
        r.present_scan_ms, _ = timed_scan(
            target.pid, category_anyof_mask=pm.PAGE_IS_PRESENT | pm.PAGE_IS_SWAPPED,
            return_mask=pm.PAGE_IS_PRESENT | pm.PAGE_IS_SWAPPED | pm.PAGE_IS_FILE)
        t = time.perf_counter()
        plan_mod.existing_pages(target.pid, vmas_mod.collect_vmas(target.pid))
        r.pread_all_ms = (time.perf_counter() - t) * 1000
        runs = page_runs(addrs)
        r.readv_ms = min(dr.raw_read(target.pid, runs) for _ in range(RAW_REPEAT)) * 1000
        # (4) the incremental dump against the predump
        ph = Phases()
        t = time.perf_counter()
        with ph.installed():
            dump(DumpOptions(pid=target.pid, images_dir=str(dump_dir), leave_running=True,
                             incremental=True, prev_images_dir=str(pre_dir),
                             compress_level=args.compress_level))
        wall = (time.perf_counter() - t) * 1000
        ds = stats_of(dump_dir)
        r.frozen, r.total, r.copy_ms = ds.frozen_ms, ds.total_ms, ds.copy_ms
        r.written, r.in_parent, r.bytes_written = (ds.pages_written, ds.pages_in_parent,
                                                   ds.bytes_written)
        r.frozen_cpu = ph.window_cpu
        r.existing_ms = sum(v[0] for p, v in ph.tree(True).items()
                            if p[-1] == "existing_pages")
        have = covered(present_ranges(dump_dir, target.pid), addrs)
        raw = r.scan_ms + r.readv_ms
        line(f"[{label}] dirtied", f"{k} pages ({len(runs)} runs) in {dirty_s * 1000:.0f} ms "
             f"(target side)")
        line(f"[{label}] raw", f"PAGEMAP_SCAN {r.scan_ms:.2f} ms ({regions} regions) + "
             f"readv {r.readv_ms:.2f} ms = {raw:.2f} ms")
        line(f"[{label}] dump --incremental", f"frozen {ds.frozen_ms:.2f} ms (ckpt CPU "
             f"{r.frozen_cpu:.2f}), copy "
             f"{ds.copy_ms:.2f} ms, total {ds.total_ms:.0f} ms (wall {wall:.0f})")
        line(f"[{label}] pages", f"written {ds.pages_written} / dirtied {k} = "
             f"{ds.pages_written / k:.3f}, in parent {ds.pages_in_parent}, "
             f"{ds.bytes_written / MIB:.2f} MiB stored, dirtied pages in image {have}/{k}")
        line(f"[{label}] frozen / raw", f"{ds.frozen_ms / raw:.1f}x  "
             f"({ds.frozen_ms * 1000 / k:.2f} us per dirty page, "
             f"{ds.frozen_ms / (size / GIB):.2f} ms per GiB)")
        if have != k:
            raise SystemExit(f"bench: the dump lacks {k - have} of the dirtied pages")
        if args.repeat > 1:
            every = [r.frozen, *(again(args, target, work / f"again-{rnd}-{k}",
                                       rnd + 2000 + 100 * k, idx, precopy=True)
                                 for k in range(1, args.repeat))]
            r.frozen = statistics.median(every)
            line(f"[{label}] frozen x{len(every)}", f"median {r.frozen:.2f} ms, min "
                 f"{min(every):.2f}, max {max(every):.2f} (the summary takes the median)")
        if not args.precopy_only:
            plain = [again(args, target, work / f"plain-{rnd}-{k}", rnd + 1000 + 100 * k, idx,
                           precopy=False) for k in range(args.repeat)]
            r.plain_frozen = statistics.median(plain)
            line(f"[{label}] dump --no-precopy", f"frozen {r.plain_frozen:.2f} ms"
                 f"{f' (median of {len(plain)})' if len(plain) > 1 else ''}: the same pages "
                 "read while frozen; a target rewriting all of them during the pre-copy "
                 "would cost this")
        if not args.quiet_breakdown and (label == "1 %" or label.endswith(" pages")
                                         or args.all_breakdowns):
            ph.report(f"dump --incremental at {label}", ds.frozen_ms)
        rounds.append(r)
        shutil.rmtree(pre_dir, ignore_errors=True)
        shutil.rmtree(dump_dir, ignore_errors=True)
    kill_and_reap(target.pid)
    pids.remove(target.pid)
    return rounds


def again(args: argparse.Namespace, target: Target, work: Path, tag: int, idx: list[int],
          precopy: bool) -> float:
    """A fresh predump, the same pages dirtied, the dump: its frozen ms."""
    pre_dir, dump_dir = work / "pre", work / "dump"
    predump(PredumpOptions(pid=target.pid, images_dir=str(pre_dir),
                           compress_level=args.compress_level))
    target.dirty(tag, idx)
    dump(DumpOptions(pid=target.pid, images_dir=str(dump_dir), leave_running=True,
                     incremental=True, prev_images_dir=str(pre_dir),
                     compress_level=args.compress_level, precopy=precopy))
    frozen = stats_of(dump_dir).frozen_ms
    shutil.rmtree(work, ignore_errors=True)
    return frozen


def summary(results: dict[int, list[Round]]) -> None:
    print("-- summary --")
    print(f"{'size':>6} {'dirty':>12} {'pages':>7} {'pre frz':>8} {'pre tot':>8} "
          f"{'frozen':>8} {'raw':>7} {'frz/raw':>8} {'wr/dirty':>8} {'us/page':>8} "
          f"{'ms/GiB':>7} {'frz cpu':>8} {'exist_pg':>8} {'pread_all':>9} {'PM_SCAN':>8} "
          f"{'no-pre':>7}")
    for size_mib, rounds in results.items():
        gib = size_mib / 1024
        for r in rounds:
            raw = r.scan_ms + r.readv_ms
            print(f"{size_mib:>5}M {r.label:>12} {r.pages:>7} {r.predump_frozen:>8.2f} "
                  f"{r.predump_total:>8.0f} {r.frozen:>8.2f} {raw:>7.2f} {r.frozen / raw:>8.1f} "
                  f"{r.written / r.pages:>8.3f} {r.frozen * 1000 / r.pages:>8.2f} "
                  f"{r.frozen / gib:>7.2f} {r.frozen_cpu:>8.2f} {r.existing_ms:>8.2f} "
                  f"{r.pread_all_ms:>9.2f} {r.present_scan_ms:>8.2f} {r.plain_frozen:>7.2f}")
    print("  pre frz/tot: predump frozen/total ms; frozen: dump --incremental frozen ms; "
          "raw: PAGEMAP_SCAN + readv of the dirtied pages (ms);\n  frz cpu: CPU ms of "
          "ckpt's main thread in the frozen window (steadier than wall on a busy machine);\n"
          "  exist_pg: ckpt's existing_pages inside the freeze; pread_all: existing_pages over "
          "every whole VMA (pread + parse);\n  PM_SCAN: one PAGEMAP_SCAN for PRESENT|SWAPPED "
          "over the address space (a replacement for both);\n  no-pre: dump --no-precopy "
          "frozen ms (every dirtied page read while frozen)")
    first = next(iter(results.values()))
    one = next((r for r in first if r.label == "1 %"), None)
    if next(iter(results)) == 1024 and one is not None:
        pre = first[0].predump_frozen
        line("goal predump frozen", f"{pre:.2f} ms (1 GiB; goal <= "
             f"{GOAL_PREDUMP_FROZEN_MS_PER_GIB:.0f} ms: "
             f"{'meets' if pre <= GOAL_PREDUMP_FROZEN_MS_PER_GIB else 'misses'})")
        line("goal dump frozen at 1 %", f"{one.frozen:.2f} ms (1 GiB; goal <= "
             f"{GOAL_DUMP_FROZEN_MS_1PCT:.0f} ms: "
             f"{'meets' if one.frozen <= GOAL_DUMP_FROZEN_MS_1PCT else 'misses'}; "
             f"--no-precopy {one.plain_frozen:.2f} ms)")
    sizes = list(results)
    if len(sizes) > 1:
        base = results[sizes[0]]
        fixed = {r.pages: r for r in base}
        for s in sizes[1:]:
            for r in results[s]:
                b = fixed.get(r.pages)
                if b is not None:
                    line(f"same {r.pages} pages", f"{sizes[0]} MiB {b.frozen:.2f} ms -> {s} MiB "
                         f"{r.frozen:.2f} ms ({r.frozen / b.frozen:.2f}x for "
                         f"{s / sizes[0]:.0f}x memory)")


def on_sigterm(signo: int, frame: object) -> None:
    raise KeyboardInterrupt  # clean up as on Ctrl-C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mib", default="1024",
                    help="comma-separated target sizes in MiB (default 1024)")
    ap.add_argument("--percents", default="0.1,1,10",
                    help="dirty fractions in %% of the target's pages (default 0.1,1,10)")
    ap.add_argument("--compress-level", type=int, default=DumpOptions.compress_level)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tmp", default=None, help="parent of the temp dir (default: $TMPDIR)")
    ap.add_argument("--all-breakdowns", action="store_true",
                    help="print the frozen-time breakdown of every dump, not only at 1 %%")
    ap.add_argument("--quiet-breakdown", action="store_true", help="no breakdowns")
    ap.add_argument("--repeat", type=int, default=1,
                    help="dump every round this many times (fresh predump each time) and "
                         "take the median frozen time: single dumps vary on a busy machine")
    ap.add_argument("--precopy-only", action="store_true",
                    help="skip the --no-precopy dump of every round")
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.sizes_mib.split(",") if s.strip()]
        args.percents = [float(p) for p in args.percents.split(",") if p.strip()]
    except ValueError:
        ap.error("--sizes-mib and --percents take comma-separated numbers")
    if not sizes or min(sizes) <= 0 or not args.percents or not all(
            0 < p <= 100 for p in args.percents):
        ap.error("sizes must be positive, percents in (0, 100]")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (ptrace, process_vm_readv)")
    signal.signal(signal.SIGTERM, on_sigterm)
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} on {os.cpu_count()} CPUs"
          + ("  (busy machine: wall times are inflated; see the cpu columns)"
             if load > (os.cpu_count() or 1) else ""), flush=True)
    fixed = max(1, round(min(sizes) * MIB // PAGE / 100)) if len(sizes) > 1 else None
    results: dict[int, list[Round]] = {}
    t0 = time.perf_counter()
    for size_mib in sizes:
        # the target, one predump's page file, bounce buffers and this process
        need = size_mib * MIB * 5 // 4 + 512 * MIB
        avail = mem_available()
        if avail < need:
            print(f"== {size_mib} MiB: skipped, MemAvailable {avail / GIB:.1f} GiB < "
                  f"{need / GIB:.1f} GiB needed ==", flush=True)
            continue
        work = Path(tempfile.mkdtemp(prefix="ckpt-bench-incr-", dir=args.tmp))
        pids: list[int] = []
        try:
            results[size_mib] = run_size(args, size_mib, work, pids,
                                         fixed if size_mib != min(sizes) else None)
        finally:
            for pid in pids:
                kill_and_reap(pid)
            shutil.rmtree(work, ignore_errors=True)
    if results:
        summary(results)
    print(f"bench took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
