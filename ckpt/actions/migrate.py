"""`ckpt migrate`: move a running process to a page server's host.

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
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckpt import testpoint
from ckpt.actions.dump import DumpOptions, dump, hidden_fds, preflight
from ckpt.actions.predump import PredumpOptions, predump
from ckpt.collect import proc
from ckpt.collect.fdkinds import kind_of
from ckpt.collect.fdkinds.base import GHOST_LIMIT, FdKind, Peek
from ckpt.collect.fdkinds.memfd import GHOST, ghost_path
from ckpt.collect.fdkinds.pipe import KIND as PIPE
from ckpt.collect.fds import FdInfo, classify_fd, read_fds
from ckpt.collect.vmas import VmaInfo, VmaKind
from ckpt.errors import CkptError
from ckpt.images import ImageDir
from ckpt.images.pb import wire_pb2
from ckpt.kernel.creds import require_root
from ckpt.kernel.probe import probe_once
from ckpt.transfer.client import (
    check_compat,
    commit_remote,
    connect,
    restore_remote,
    send_pass_on,
    sync_remote,
)
from ckpt.transfer.wire import Conn, TransferError

FILE_KINDS = frozenset({VmaKind.FILE_PRIVATE, VmaKind.FILE_SHARED})
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


@dataclass
class Round:
    n: int
    dirty_pages: int
    bytes_sent: int
    seconds: float
    duty: float = 0.0  # --auto-converge: the share of the time the target was stopped

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
    # the destination's restore (and the round trip), killing the source, the commit
    downtime_parts: dict[str, float] = field(default_factory=dict)
    stop_reason: str = ""

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes_sent for r in self.rounds)


def migrate(opts: MigrateOptions, report: Callable[[str], None]) -> MigrateResult:
    t0 = time.perf_counter()
    require_root("migrate")
    # Whatever would stop the final dump (an fd kind we cannot carry, children, ...)
    # stops the migration before any round, like a failed server check.
    vmas = preflight(DumpOptions(pid=opts.pid, images_dir="", externals=False, migrating=True,
                                 ghost_limit=opts.ghost_limit, tcp_close=opts.tcp_close))
    work = Path(opts.keep_images or tempfile.mkdtemp(prefix="ckpt-migrate-"))
    out = MigrateResult()
    try:
        with connect(opts.host, opts.port, opts.token, opts.tls) as conn:
            check_compat(conn, compat_request(opts.pid, vmas))
            prev = run_rounds(opts, conn, work, out, report)
            prev = catch_up(opts, conn, work, out, prev, report)
            final_round(opts, conn, work, str(len(out.rounds) + 1), prev, out)
            last = out.rounds[-1]
            report(f"round {last.n} (final, process frozen): {last.dirty_pages} dirty pages, "
                   f"{last.bytes_sent / 2**20:.2f} MiB sent")
    finally:
        if not opts.keep_images:
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
    would carry as much as the last."""
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


def compat_request(pid: int, vmas: list[VmaInfo]) -> wire_pb2.CompatCheck:
    """What the destination must offer: this CPU's XSTATE layout, the vdso layout, every
    file the process maps or has open by path (FIFOs too), and the directory of each
    deleted file it has open (restore makes the file again there). The process runs
    meanwhile: only the fd links are read (read_fds, kind_of), never an object's state."""
    caps = probe_once()
    files = {proc.read_exe(pid)}
    files |= {v.path for v in vmas if v.inode and v.kind in FILE_KINDS}
    hidden = hidden_fds(pid)
    infos = [i for i in read_fds(pid) if i.fd not in hidden]
    with Peek(pid, infos) as peek:
        for info in infos:
            files |= reopened_paths(info, kind_of(info, peek))
    return wire_pb2.CompatCheck(xstate_size=caps.xstate_size or 0, xcr0=caps.xcr0 or 0,
                                vdso_layout=caps.get("vdso-layout").detail,
                                files=sorted(f for f in files if f))


def reopened_paths(info: FdInfo, kind: FdKind | None) -> set[str]:
    """The paths a restore of this fd opens or makes a file in ({} if none)."""
    if kind is GHOST:
        return {os.path.dirname(ghost_path(info.target)) or "/"}
    if kind is PIPE and info.target.startswith("/"):  # a named FIFO
        return {info.target}
    if kind is None and classify_fd(info) not in ("tty", "dev_null"):
        return {info.target} if info.target.startswith("/") else set()
    return set()


def pre_round(opts: MigrateOptions, conn: Conn, work: Path, n: int, prev: str | None,
              duty: float) -> Round:
    t = time.perf_counter()
    predump(PredumpOptions(pid=opts.pid, images_dir=str(work / str(n)), prev_images_dir=prev,
                           track=opts.track, compress_level=opts.compress_level,
                           ghost_limit=opts.ghost_limit, tcp_close=opts.tcp_close,
                           externals=False, migrating=True))
    dirty = ImageDir.open(work / str(n)).read_inventory().stats.pages_written
    with Throttle(opts.pid, duty) as throttle:
        sent = send_pass_on(conn, work / str(n), str(n), prerestore=True)
    return Round(n, dirty, sent.bytes, time.perf_counter() - t, throttle.duty)


# Runs in a child of its own session (a Ctrl-C to ckpt's group does not reach it): holds a
# pidfd of the target, says it is ready, and sends SIGCONT when its stdin reaches EOF —
# when the throttle ends, or when ckpt dies, however it dies.
WATCHDOG = """import os, signal, sys
pidfd = os.pidfd_open(int(sys.argv[1]))
os.write(1, b"r")
while os.read(0, 1):
    pass
try:
    signal.pidfd_send_signal(pidfd, signal.SIGCONT)
except ProcessLookupError:
    pass
"""


class Throttle:
    """Auto-converge: while a round is sent, stop the target ``duty`` of the time
    (SIGSTOP/SIGCONT every PERIOD), so it dirties less than the link carries. It always
    ends with SIGCONT; a SIGSTOP is visible to the target's parent like a job stop.
    A watchdog child (WATCHDOG) holds a pipe from ckpt: if ckpt is killed while the
    target is stopped, the pipe closes and the watchdog sends the SIGCONT.
    A target already in a job-control stop (state T) when the round starts is not
    throttled (duty 0): it dirties nothing, and the closing SIGCONT would undo its
    user's stop. (A stop its user sends during a throttled round looks like ours and
    ends with the round.)"""

    PERIOD = 0.05

    def __init__(self, pid: int, duty: float) -> None:
        self.pid = pid
        self.duty = duty
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.guard = -1

    def __enter__(self) -> Throttle:
        if self.duty > 0 and job_stopped(self.pid):
            self.duty = 0.0
        if self.duty > 0:
            self._start_watchdog()
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _start_watchdog(self) -> None:
        rfd, self.guard = os.pipe2(os.O_CLOEXEC)
        try:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", WATCHDOG, str(self.pid)], stdin=rfd,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(rfd)
        assert self.watchdog.stdout is not None
        if self.watchdog.stdout.read(1) != b"r":
            raise CkptError(f"cannot throttle process {self.pid}: it is gone")

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
        if self.watchdog is not None:
            os.close(self.guard)
            self.watchdog.wait()
            if self.watchdog.stdout is not None:
                self.watchdog.stdout.close()

    def _run(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            while not self.stop.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                testpoint.pause_at("throttled")
                self.stop.wait(self.PERIOD * self.duty)
                os.kill(self.pid, signal.SIGCONT)
                self.stop.wait(self.PERIOD * (1 - self.duty))


def job_stopped(pid: int) -> bool:
    """Is ``pid`` in a job-control stop (state T; a tracing stop is t)?"""
    try:
        return proc.read_stat(pid).state == "T"
    except CkptError:  # gone: the throttle's first signal says so
        return False


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
    marks: dict[str, float] = {}

    def hand_over() -> None:
        marks["dumped"] = time.perf_counter()
        sent = send_pass_on(conn, work / name, name)
        marks["sent"] = time.perf_counter()
        done = restore_remote(conn, name)
        marks["restored"] = time.perf_counter()
        out.new_pid, out.restore_ms, out.restore_warm = done.pid, done.restore_ms, done.warm
        out.rounds.append(Round(int(name), ImageDir.open(work / name).read_inventory()
                                .stats.pages_written, sent.bytes, 0.0))

    def commit() -> None:
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
                               ghost_limit=opts.ghost_limit,
                               tcp_close=opts.tcp_close))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDOVER_SIGNALS)
    stats = ImageDir.open(work / name).read_inventory().stats
    out.frozen_ms = stats.frozen_ms
    out.downtime_ms = (marks["committed"] - res.frozen_at) * 1000  # frozen → running there
    last = res.frozen_at
    for step in ("dumped", "sent", "restored", "killed", "committed"):
        out.downtime_parts[step] = round((marks[step] - last) * 1000, 2)
        last = marks[step]
