"""`ckpt migrate`: move a running process, or a process tree (``-t ROOT``: ROOT and its
descendants, every step over every member as in predump and dump), to a page server's host.

    check       the target is dumpable (fds, children); the destination authenticates
                and says it can run it; one connection serves the whole migration
    rounds      predump → send, while the process runs (uffd-wp: no freeze at all);
                the destination applies each round to a process it builds meanwhile
                (ckpt.restore.warm); stop when the last round's transfer time predicts a
                final round within --max-downtime-ms, when the dirty set stops
                shrinking, or at --max-rounds
    final       freeze; dump --incremental; send it; the destination applies it, completes
                the process and holds it stopped      (downtime starts at the freeze)
    hand over   kill the frozen source, commit: the destination lets it run (downtime ends;
                a process dumped in a job-control stop stays stopped there)
Any failure before the hand-over thaws the source, and the destination never lets its
stopped copy run without a commit: never two live copies. The source sends the commit only
once its own copy is dead (SIGKILL queued); if the link breaks right then, it reconnects
and commits by pid while the destination keeps its copy stopped (ckpt.transfer.handover).
Only ckpt itself dying in that instant (after the kill, before the commit left) loses
both: the destination kills its copy when the grace period ends.

A tree: each round is a predump of every member (a member new since the last round is
copied whole, one gone is left out); the destination stores the rounds and restores the
tree cold from the final dump, with its pids (no warm copy: ckpt.transfer.tree). Where the
destination sees those pids held by this very tree (one kernel), it restores it only once
the source killed it (ckpt.actions.migrate_tree).
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckpt import testpoint
from ckpt.actions.dump import DumpOptions, dump
from ckpt.actions.migrate_check import check_members, compat_request
from ckpt.actions.migrate_tree import restore_after_kill
from ckpt.actions.predump import PredumpOptions, predump
from ckpt.actions.throttle import Throttle
from ckpt.collect.fdkinds.base import GHOST_LIMIT
from ckpt.freeze.tree import list_tree
from ckpt.images import ImageDir
from ckpt.kernel.creds import require_root
from ckpt.transfer.client import (
    check_compat,
    commit_remote,
    connect,
    restore_remote,
    send_pass_on,
    sync_remote,
)
from ckpt.transfer.wire import Conn, TransferError

__all__ = ["MigrateOptions", "MigrateResult", "Throttle", "compat_request", "migrate"]
NOT_CONVERGING = ("dirty set stopped shrinking (the process dirties memory as fast as the "
                  "link carries it)")
CATCH_UP_ROUNDS = 3
COMMIT_RETRY_S = 20.0  # well inside the destination's commit grace period
HANDOVER_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
DUTY_STEP = 0.3  # --auto-converge: each non-converging round stops the target 30% more
MAX_DUTY = 0.9
# A round must leave at most this share of the previous round's dirty pages to count as
# shrinking; 8251 -> 8225 pages is noise, not convergence.
SHRINK = 0.9


@dataclass(frozen=True)
class MigrateOptions:
    pid: int
    host: str
    port: int
    token: bytes
    tls: ssl.SSLContext | None = None
    max_rounds: int = 8
    max_downtime_ms: float = 50.0
    track: str = "auto"
    compress_level: int = -1
    keep_images: str | None = None  # keep the source's images here
    auto_converge: bool = False
    ghost_limit: int = GHOST_LIMIT  # --ghost-limit (ckpt.collect.fdkinds.memfd)
    tcp_close: bool = False  # --tcp-close: TCP connections restored closed at the destination
    # set by migrate itself: a tree, restored cold at the destination from the final dump
    # (no warm copy): what a dump carries in its images travels (FdFlags.cold)
    cold: bool = False


@dataclass
class Round:
    n: int
    dirty_pages: int
    bytes_sent: int
    seconds: float
    duty: float = 0.0  # --auto-converge: the share of the time the target was stopped
    processes: int = 1  # members of the tree in this pass

    @property
    def rate(self) -> float:
        return self.bytes_sent / self.seconds if self.seconds > 0 else 0.0


@dataclass
class MigrateResult:
    rounds: list[Round] = field(default_factory=list)
    new_pid: int = 0
    total_s: float = 0.0
    downtime_ms: float = 0.0
    frozen_ms: float = 0.0
    restore_ms: float = 0.0
    restore_warm: bool = False  # the destination had built the process during the rounds
    # where the downtime went, in ms: final dump (freeze to images written), sending it,
    # the destination's restore (and the round trip), killing the source, the commit. A
    # tree restored only after the kill (ckpt.actions.migrate_tree): "restored" is the
    # destination's answer, "committed" its wait for the pids and its restore
    downtime_parts: dict[str, float] = field(default_factory=dict)
    stop_reason: str = ""
    pids: list[int] = field(default_factory=list)  # a tree: every member, root first
    images_kept: bool = False  # the source is gone and its restore is not confirmed

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes_sent for r in self.rounds)


def migrate(opts: MigrateOptions, report: Callable[[str], None]) -> MigrateResult:
    t0 = time.perf_counter()
    require_root("migrate")
    # Whatever would stop the final dump (an fd kind we cannot carry, a member's, ...)
    # stops the migration before any round, like a failed server check.
    opts = dataclasses.replace(opts, cold=len(list_tree(opts.pid)) > 1)
    members = check_members(DumpOptions(pid=opts.pid, images_dir="", externals=False,
                                        migrating=True, ghost_limit=opts.ghost_limit,
                                        tcp_close=opts.tcp_close, cold=opts.cold))
    work = Path(opts.keep_images or tempfile.mkdtemp(prefix="ckpt-migrate-"))
    out = MigrateResult()
    try:
        with connect(opts.host, opts.port, opts.token, opts.tls) as conn:
            check_compat(conn, compat_request(opts.pid, members[opts.pid], members))
            prev = run_rounds(opts, conn, work, out, report)
            prev = catch_up(opts, conn, work, out, prev, report)
            final_round(opts, conn, work, str(len(out.rounds) + 1), prev, out)
            last = out.rounds[-1]
            report(f"round {last.n} (final, process frozen): {last.dirty_pages} dirty pages, "
                   f"{last.bytes_sent / 2**20:.2f} MiB sent")
    finally:
        if not opts.keep_images and not out.images_kept:
            shutil.rmtree(work, ignore_errors=True)
    out.total_s = time.perf_counter() - t0
    return out


def run_rounds(opts: MigrateOptions, conn: Conn, work: Path, out: MigrateResult,
               report: Callable[[str], None]) -> str | None:
    """Pre-copy rounds until converged(); returns the last round's link for the final."""
    prev: str | None = None
    duty = 0.0
    for n in range(1, opts.max_rounds + 1):
        out.rounds.append(pre_round(opts, conn, work, n, prev, duty))
        report(round_line(out.rounds[-1]))
        prev = f"../{n}"
        out.stop_reason = converged(out.rounds, opts)
        if out.stop_reason == NOT_CONVERGING and opts.auto_converge and duty < MAX_DUTY:
            duty = min(MAX_DUTY, duty + DUTY_STEP)  # auto-converge: slow it down
            out.stop_reason = ""
            continue
        if out.stop_reason:
            break
    return prev


def round_line(r: Round) -> str:
    throttled = f", target throttled to {100 - r.duty * 100:.0f}% CPU" if r.duty else ""
    return (f"round {r.n}: {r.dirty_pages} dirty pages, {r.bytes_sent / 2**20:.2f} MiB sent "
            f"in {r.seconds * 1000:.0f} ms ({r.rate / 2**20:.1f} MiB/s){throttled}")


def catch_up(opts: MigrateOptions, conn: Conn, work: Path, out: MigrateResult,
             prev: str | None, report: Callable[[str], None]) -> str | None:
    """Let the destination finish applying the rounds before the freeze (its restore is
    then only the final pass). A long wait let the target dirty more: another round, until
    the destination keeps up (a round's worth of changes applies quickly), at most
    CATCH_UP_ROUNDS times, and never for a target that did not converge: its next round
    would carry as much as the last. A tree builds nothing there before the final pass:
    nothing to wait for."""
    if out.rounds and out.rounds[-1].processes > 1:
        return prev
    for k in range(CATCH_UP_ROUNDS + 1):
        t = time.perf_counter()
        why = sync_remote(conn)
        waited_ms = (time.perf_counter() - t) * 1000
        if why:
            report(f"destination gave up its warm restore ({why}); the final restore is a "
                   "full one")
            return prev
        report(f"destination caught up in {waited_ms:.0f} ms")
        if (waited_ms <= opts.max_downtime_ms or k == CATCH_UP_ROUNDS
                or out.stop_reason == NOT_CONVERGING):
            return prev
        n = len(out.rounds) + 1
        out.rounds.append(pre_round(opts, conn, work, n, prev, 0.0))
        report(round_line(out.rounds[-1]) + " (catch-up)")
        prev = f"../{n}"
    return prev


def commit_again(opts: MigrateOptions, pid: int, why: TransferError) -> None:
    """The link broke during the commit, the source already dead: the destination keeps
    its copy stopped for a while (ckpt.transfer.handover), so reconnect and commit it."""
    deadline = time.monotonic() + COMMIT_RETRY_S
    while True:
        try:
            with connect(opts.host, opts.port, opts.token, opts.tls) as conn:
                commit_remote(conn, pid)
            return
        except TransferError as exc:
            why = exc
        if time.monotonic() > deadline:
            raise TransferError(f"the source process is gone, but the destination did not "
                                f"confirm that pid {pid} runs there ({why}); it runs it if "
                                "the commit arrived, and kills it otherwise") from None
        time.sleep(0.5)


def pre_round(opts: MigrateOptions, conn: Conn, work: Path, n: int, prev: str | None,
              duty: float) -> Round:
    t = time.perf_counter()
    predump(PredumpOptions(pid=opts.pid, images_dir=str(work / str(n)), prev_images_dir=prev,
                           track=opts.track, compress_level=opts.compress_level,
                           ghost_limit=opts.ghost_limit, tcp_close=opts.tcp_close,
                           externals=False, migrating=True, cold=opts.cold))
    inv = ImageDir.open(work / str(n)).read_inventory()
    # The destination keeps a warm copy of one process only: a tree's passes are stored,
    # and the tree restored cold from the final one (ckpt.transfer.prerestore)
    with Throttle(list(inv.pids) or [opts.pid], duty) as throttle:
        sent = send_pass_on(conn, work / str(n), str(n),
                            prerestore=not opts.cold and len(inv.pids) <= 1)
    testpoint.pause_at("round-sent")
    return Round(n, inv.stats.pages_written, sent.bytes, time.perf_counter() - t,
                 throttle.duty, max(len(inv.pids), 1))


def converged(rounds: list[Round], opts: MigrateOptions) -> str:
    """Why to stop iterating now, or '' to go on."""
    last = rounds[-1]
    if len(rounds) >= 2:
        # The next round carries about what the last one did, at the link's rate: the
        # best any round reached (a small round's own rate is mostly fixed overhead).
        link_rate = max(r.rate for r in rounds)
        estimate_ms = last.bytes_sent / max(link_rate, 1.0) * 1000
        if estimate_ms <= opts.max_downtime_ms:
            return f"estimated final round {estimate_ms:.1f} ms fits --max-downtime-ms"
        if last.dirty_pages > rounds[-2].dirty_pages * SHRINK:
            return NOT_CONVERGING
    if len(rounds) >= opts.max_rounds:
        return f"--max-rounds {opts.max_rounds} reached"
    return ""


def final_round(opts: MigrateOptions, conn: Conn, work: Path, name: str, prev: str | None,
                out: MigrateResult) -> None:
    """Freeze, dump --incremental, send, restore there, kill here, commit. A tree whose
    pids the destination sees held by these very processes (one kernel: the demo's
    network-namespace hosts) cannot be restored there before they die: the destination
    answers RestoreDone{pid=0}, the tree is killed first, and the Commit has it restored
    (ckpt.actions.migrate_tree)."""
    marks: dict[str, float] = {}
    deferred = False

    def hand_over() -> None:
        nonlocal deferred
        marks["dumped"] = time.perf_counter()
        sent = send_pass_on(conn, work / name, name)
        marks["sent"] = time.perf_counter()
        done = restore_remote(conn, name)
        marks["restored"] = time.perf_counter()
        inv = ImageDir.open(work / name).read_inventory()
        out.rounds.append(Round(int(name), inv.stats.pages_written, sent.bytes, 0.0, 0.0,
                                max(len(inv.pids), 1)))
        out.pids = list(inv.pids)
        if done.pid == 0:
            deferred = True
            out.images_kept = True  # from the kill on, the only copy until it is restored
            # from the kill on, only the Commit brings the tree back: Ctrl-C waits
            signal.pthread_sigmask(signal.SIG_BLOCK, HANDOVER_SIGNALS)
            return
        out.new_pid, out.restore_ms, out.restore_warm = done.pid, done.restore_ms, done.warm

    def commit() -> None:
        if deferred:
            return  # once every member is dead and reaped from ptrace (dump returns)
        marks["killed"] = time.perf_counter()
        # The source is dead: from here only a Commit reaching the destination keeps the
        # process alive. Ctrl-C must not cut this short (it is delivered afterwards).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDOVER_SIGNALS)
        try:
            commit_remote(conn)
        except TransferError as exc:
            commit_again(opts, out.new_pid, exc)
        marks["committed"] = time.perf_counter()

    try:
        res = dump(DumpOptions(pid=opts.pid, images_dir=str(work / name), prev_images_dir=prev,
                               incremental=prev is not None, track=opts.track,
                               compress_level=opts.compress_level, before_kill=hand_over,
                               after_kill=commit, externals=False, migrating=True,
                               cold=opts.cold,
                               ghost_limit=opts.ghost_limit,
                               tcp_close=opts.tcp_close))
        if deferred:
            marks["killed"] = time.perf_counter()
            out.new_pid = opts.pid
            restore_after_kill(conn, work / name, opts.pid)  # raises: the images stay
            out.images_kept = False  # restored: the images may go
            marks["committed"] = time.perf_counter()
            out.restore_ms = (marks["committed"] - marks["killed"]) * 1000
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDOVER_SIGNALS)
    stats = ImageDir.open(work / name).read_inventory().stats
    out.frozen_ms = stats.frozen_ms
    out.downtime_ms = (marks["committed"] - res.frozen_at) * 1000  # frozen → running there
    last = res.frozen_at
    for step in ("dumped", "sent", "restored", "killed", "committed"):
        out.downtime_parts[step] = round((marks[step] - last) * 1000, 2)
        last = marks[step]
