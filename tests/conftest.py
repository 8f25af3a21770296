"""End-to-end harness: build the C targets, launch targets, run the installed `ckpt`
command, and kill every process a test started (restored ones too), even on failure.

Targets live in examples/targets/; C ones are built once per session into tests/bin/.
A target runs in its own session, stdin from /dev/null, stdout and stderr sharing one
plain (not O_APPEND) open file, so a correct restore must bring back the shared file
offset: a wrong one shows up as NUL holes, gaps or overwritten lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

# the soft_dirty marker (tests needing CONFIG_MEM_SOFT_DIRTY are skipped without it)
pytest_plugins = ["vm.plugin"]

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ROOT / "examples" / "targets"
BIN = ROOT / "tests" / "bin"
PYTHON = sys.executable

# Inside the QEMU guest (software emulation) everything runs several times slower.
CKPT_TIMEOUT = 90.0 * (4 if os.environ.get("CKPT_IN_VM") else 1)
POLL = 0.02

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="checkpoint/restore needs root")

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_CHILD_SUBREAPER = 36
_SYS_KCMP = 312
_KCMP_FILE = 0


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Bins:
    """Paths of the compiled C targets."""

    counter_dyn: Path
    counter_static: Path
    fpu: Path
    sleeper: Path
    signals: Path
    scenarios: Path
    pauser: Path
    pauser_static: Path


# name -> (source, flags before the source, flags after it)
_BUILDS: dict[str, tuple[str, list[str], list[str]]] = {
    "counter_dyn": ("counter.c", ["-O2"], []),
    "counter_static": ("counter.c", ["-O2", "-static"], []),
    "fpu": ("fpu.c", ["-O2", "-march=native"], ["-lm"]),
    "sleeper": ("sleeper.c", ["-O2"], []),
    "signals": ("signals.c", ["-O2"], []),
    "scenarios": ("scenarios.c", ["-O2", "-pthread"], []),
    "pauser": ("pauser.c", ["-O2", "-pthread"], []),
    "pauser_static": ("pauser.c", ["-O2", "-pthread", "-static"], []),
}


def _build(name: str) -> Path:
    source, cflags, libs = _BUILDS[name]
    src = TARGETS / source
    out = BIN / name
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    tmp = BIN / f".{name}.{os.getpid()}"
    cmd = ["gcc", "-Wall", "-Wextra", *cflags, "-o", str(tmp), str(src), *libs]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.fail(f"building {name} failed: {' '.join(cmd)}\n{res.stderr}")
    tmp.replace(out)
    return out


@pytest.fixture(scope="session")
def bins() -> Bins:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    BIN.mkdir(parents=True, exist_ok=True)
    return Bins(**{name: _build(name) for name in _BUILDS})


def require_reachable_by_others() -> None:
    """Tests that run ckpt or a target as uid 65534 need this checkout reachable by other
    users (search permission on it and every directory above it; .ci/run grants it). A
    private checkout skips them, saying why; under CI it is a failure."""
    blocked = [p for p in (ROOT, *ROOT.parents) if not p.stat().st_mode & 0o001]
    if blocked:
        why = (f"uid 65534 cannot reach this checkout ({blocked[0]} has no search permission "
               "for others; .ci/run grants it)")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def py_target(name: str) -> list[str]:
    """argv prefix running examples/targets/<name> with this interpreter."""
    return [PYTHON, str(TARGETS / name)]


def bigmem_dumped(harness: Harness, out: Path) -> tuple[int, Path, int]:
    """examples/targets/bigmem.py (64 MiB it checksums) started, dumped and reaped:
    its pid, the images, and how many lines it wrote before the dump."""
    proc = harness.launch(py_target("bigmem.py"), out)
    wait_for_lines(out, 3, timeout=30)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    return proc.pid, images, len(read_lines(out))


def assert_bigmem_reference(out: Path) -> None:
    """Every line bigmem.py wrote (restores included) equals a fresh reference run's."""
    got = read_lines(out)
    ref = subprocess.run([PYTHON, str(TARGETS / "bigmem.py"), "--iters", str(len(got))],
                         capture_output=True, text=True, timeout=120, check=True)
    assert got == ref.stdout.splitlines()


# --------------------------------------------------------------------------- /proc


def proc_status(pid: int, tid: int | None = None) -> dict[str, str] | None:
    """/proc/PID/status (or /proc/PID/task/TID/status) as a dict; None if gone."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    try:
        text = Path(path).read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def is_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    st = proc_status(pid)
    return st is not None and not st.get("State", "").startswith(("Z", "X"))


def thread_ids(pid: int) -> set[int]:
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except FileNotFoundError:
        return set()


def fd_links(pid: int) -> dict[int, str]:
    """fd number -> readlink of /proc/PID/fd/N."""
    links: dict[int, str] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            links[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return links


def ctx_switches(pid: int) -> tuple[int, int]:
    """(voluntary, nonvoluntary) context switches of the main thread."""
    st = proc_status(pid)
    assert st is not None, f"process {pid} is gone"
    return int(st["voluntary_ctxt_switches"]), int(st["nonvoluntary_ctxt_switches"])


def same_open_file(pid: int, fd1: int, fd2: int) -> bool:
    """kcmp(KCMP_FILE): do two fds of pid share one open file description (one offset)?"""
    rc: int = _libc.syscall(
        ctypes.c_long(_SYS_KCMP),
        ctypes.c_long(pid),
        ctypes.c_long(pid),
        ctypes.c_long(_KCMP_FILE),
        ctypes.c_long(fd1),
        ctypes.c_long(fd2),
    )
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"kcmp({pid}, fd {fd1}, fd {fd2}): {os.strerror(err)}")
    return rc == 0


def pids_running(exe: Path) -> set[int]:
    """Live processes whose /proc/PID/exe is exe."""
    found: set[int] = set()
    target = str(exe.resolve())
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/exe") == target and is_alive(int(name)):
                found.add(int(name))
        except OSError:
            continue
    return found


def find_kernel_thread() -> int | None:
    """A kernel thread's pid (kthreadd if visible), or None inside a pid namespace."""
    candidates = [2, *sorted(int(n) for n in os.listdir("/proc") if n.isdigit())]
    for pid in candidates:
        st = proc_status(pid)
        if st is not None and st.get("Kthread") == "1":
            return pid
    return None


# --------------------------------------------------------------------------- waiting


def wait_for(pred: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll pred until it returns something other than None/False."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(POLL)


def read_lines(path: Path) -> list[str]:
    """Complete lines of path (a trailing partial line is left out)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n")
    if end < 0:
        return []
    return data[:end].decode(errors="replace").split("\n")


def wait_for_lines(path: Path, n: int, timeout: float = 10.0) -> list[str]:
    """Wait until path holds at least n complete lines; return them all."""
    deadline = time.monotonic() + timeout
    while True:
        lines = read_lines(path)
        if len(lines) >= n:
            return lines
        if time.monotonic() > deadline:
            tail = "\n".join(lines[-5:])
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {n} lines in {path} "
                        f"(have {len(lines)}); last lines:\n{tail}")
        time.sleep(POLL)


def wait_for_line(path: Path, pred: Callable[[str], bool], timeout: float, what: str) -> str:
    """Wait for a complete line satisfying pred; return the first such line."""

    def find() -> str | None:
        return next((line for line in read_lines(path) if pred(line)), None)

    try:
        return wait_for(find, timeout, f"{what} in {path}")
    except pytest.fail.Exception:
        tail = "\n".join(read_lines(path)[-5:])
        pytest.fail(f"timed out after {timeout:.1f}s waiting for {what} in {path}; "
                    f"last lines:\n{tail}")


def assert_running_untraced(pid: int, settle: float = 2.0) -> None:
    """pid and all its threads are alive, not stopped/traced, and have no tracer."""

    def problems() -> list[str]:
        if not is_alive(pid):
            return [f"process {pid} is not running"]
        found = []
        for tid in thread_ids(pid):
            st = proc_status(pid, tid)
            if st is None:
                continue
            if st.get("TracerPid") != "0":
                found.append(f"tid {tid}: TracerPid {st.get('TracerPid')}")
            if st.get("State", "").startswith(("t", "T")):
                found.append(f"tid {tid}: state {st.get('State')}")
        return found

    deadline = time.monotonic() + settle
    while (found := problems()) and time.monotonic() < deadline:
        time.sleep(POLL)
    assert not found, "; ".join(found)


# --------------------------------------------------------------------------- counter lines

COUNTER_RE = re.compile(r"n=(\d{8}) m=(\d{8}) h=(\d{8}) f=(\d{8}\.\d) pid=(\d{7})")
COUNTER_LINE_LEN = len("n=00000001 m=00000002 h=00000003 f=00000000.5 pid=0000001\n")


def counter_line(n: int, pid: int) -> str:
    """The exact line counter.c / counter.py print for step n."""
    return f"n={n:08d} m={2 * n:08d} h={3 * n:08d} f={n * 0.5:010.1f} pid={pid:07d}"


def check_counter_file(path: Path) -> list[int]:
    """Assert path is exactly lines 1..N of a counter, each written whole at its own
    offset (no NULs, no gap, no repeat, no torn line); return the pid of each line."""
    data = path.read_bytes()
    nul = data.find(b"\0")
    assert nul < 0, f"NUL bytes (a hole) at offset {nul} of {path}"
    assert data.endswith(b"\n"), f"{path} ends in a partial line: {data[-80:]!r}"
    assert len(data) % COUNTER_LINE_LEN == 0, f"{path}: size {len(data)} is not whole lines"
    pids = []
    for i, line in enumerate(data.decode().splitlines(), 1):
        match = COUNTER_RE.fullmatch(line)
        assert match, f"{path} line {i} is malformed: {line!r}"
        pid = int(match.group(5))
        assert line == counter_line(i, pid), f"{path} line {i} is {line!r}, not step {i}"
        pids.append(pid)
    return pids


# --------------------------------------------------------------------------- ckpt


@dataclass(frozen=True)
class CkptResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"`ckpt {' '.join(self.args)}` exited {self.returncode}\n"
                f"--- stdout:\n{self.stdout}--- stderr:\n{self.stderr}")


def ckpt_command() -> str:
    found = shutil.which("ckpt", path=str(Path(PYTHON).parent)) or shutil.which("ckpt")
    if found is None:
        pytest.fail("the `ckpt` command is not installed (pip install -e .)")
    return found


def run_ckpt(*args: str | Path, timeout: float = CKPT_TIMEOUT,
             reap: subprocess.Popen[bytes] | None = None,
             prefix: Sequence[str] = (), pass_fds: Sequence[int] = ()) -> CkptResult:
    """Run the installed ckpt command. Output goes to files, not pipes, so a restored
    process that inherited them cannot keep this call waiting. With reap, that child of
    ours is reaped as soon as it dies, the way a shell reaps a killed job. ``prefix`` runs
    it through another command (e.g. `ip netns exec NS`); ``pass_fds`` stay open in it
    (--inherit-fd)."""
    argv = tuple(str(a) for a in args)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([*prefix, ckpt_command(), *argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, pass_fds=pass_fds)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if reap is not None:
                reap.poll()
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"`ckpt {' '.join(argv)}` did not finish within {timeout:.0f}s")
            time.sleep(POLL / 4)
        out.seek(0)
        err.seek(0)
        return CkptResult(argv, proc.returncode, out.read().decode(errors="replace"),
                          err.read().decode(errors="replace"))


def assert_ckpt_ok(res: CkptResult) -> None:
    assert res.returncode == 0, res.describe()
    assert "Traceback" not in res.stderr, res.describe()


def assert_one_error_line(res: CkptResult) -> str:
    """A user error: non-zero exit, exactly one stderr line `Error: ...`, no traceback."""
    assert res.returncode != 0, res.describe()
    assert "Traceback" not in res.stderr + res.stdout, res.describe()
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line\n{res.describe()}"
    assert lines[0].startswith("Error: "), res.describe()
    return lines[0]


# --------------------------------------------------------------------------- harness


# ckpt restore's words for a dumped pid or tid another process holds (ckpt.restore)
ID_TAKEN = re.compile(r"(?:pid|thread id) \d+ is taken by (?:thread \d+ of )?process (\d+)")


class Harness:
    """Starts targets and restores, and remembers every pid to kill at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._children: list[subprocess.Popen[bytes]] = []
        self._pids: set[int] = set()
        self._pidfiles: list[Path] = []
        # Orphans (restored processes whose restorer exited) are reparented to us, so
        # they can be reaped and do not linger as zombies holding their pid.
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def launch(self, argv: Sequence[str | Path], out: Path,
               pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
        """Start a target in its own session: stdin /dev/null, stdout+stderr one open
        file (truncated, not O_APPEND, shared offset); no other fd but ``pass_fds``."""
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                    stdout=fd, stderr=fd, start_new_session=True,
                                    pass_fds=pass_fds)
        finally:
            os.close(fd)
        self._children.append(proc)
        return proc

    def track(self, pid: int) -> None:
        """Kill pid at teardown (a restored process)."""
        self._pids.add(pid)

    def new_pidfile(self) -> Path:
        path = self.tmp / f"restored-{len(self._pidfiles)}.pid"
        self._pidfiles.append(path)
        return path

    def images(self, name: str = "images") -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        return path

    def dump(self, pid: int, images: Path, *extra: str) -> CkptResult:
        res = run_ckpt("dump", "-t", str(pid), "-D", images, *extra)
        assert_ckpt_ok(res)
        return res

    def dump_and_reap(self, proc: subprocess.Popen[bytes], images: Path, *extra: str) -> None:
        """Dump (which kills the target) and reap it, so its pid is free again."""
        assert_ckpt_ok(run_ckpt("dump", "-t", str(proc.pid), "-D", images, *extra, reap=proc))
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"target {proc.pid} still runs after a dump without --leave-running")

    def restore_detached(self, images: Path, *extra: str, pass_fds: Sequence[int] = ()) -> int:
        """`ckpt restore --restore-detached --pidfile F`; return the restored pid."""
        pidfile = self.new_pidfile()
        res = run_ckpt("restore", "-D", images, "--restore-detached", "--pidfile", pidfile,
                       *extra, pass_fds=pass_fds)
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.track(int(pidfile.read_text().strip()))
        self.skip_if_ids_reused(res)
        assert_ckpt_ok(res)
        assert pidfile.exists(), f"restore did not write the pidfile\n{res.describe()}"
        pid = int(pidfile.read_text().strip())
        assert is_alive(pid), f"restored process {pid} is not running\n{res.describe()}"
        return pid

    def skip_if_ids_reused(self, res: CkptResult) -> None:
        """A restore under the dumped ids failed because a process this test did not start
        took one of them after the dump (pid_max is 32768 here and other work forks):
        skip, saying so, instead of failing. One of ours holding it is a real failure."""
        if res.returncode != 0 and "something else keeps taking it" in res.stderr:
            pytest.skip(f"PID race: other processes forked through the dumped pid while "
                        f"the restore asked for it: {res.stderr.strip()}")
        taken = ID_TAKEN.search(res.stderr)
        if res.returncode == 0 or taken is None:
            return
        holder = int(taken[1])
        if holder not in self._pids | {c.pid for c in self._children}:
            pytest.skip(f"PID reuse: an unrelated process took an id between dump and "
                        f"restore: {res.stderr.strip()}")

    def kill(self, pid: int) -> None:
        """SIGKILL pid and wait until it is gone (reaping it if it is our child)."""
        for child in self._children:
            if child.pid == pid and child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                child.wait(timeout=10)
                return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    return
            except ChildProcessError:
                if not is_alive(pid):
                    return
            time.sleep(POLL)
        pytest.fail(f"process {pid} did not die after SIGKILL")

    def cleanup(self) -> None:
        for pidfile in self._pidfiles:
            with contextlib.suppress(FileNotFoundError, ValueError):
                self._pids.add(int(pidfile.read_text().strip()))
        for child in self._children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)
        # Copies a failed test never learned of (restored or migrated, then reparented
        # to us): our children whose output goes into this test's directory.
        self._pids |= {pid for pid in our_children() if self._writes_here(pid)}
        for pid in self._pids - {os.getpid()}:
            if is_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(is_alive(p) for p in self._pids) and time.monotonic() < deadline:
            time.sleep(POLL)
        # Reap whatever was reparented to us (we are a child subreaper); a killed tree's
        # grandchildren come to us only once their parent is gone: look again until
        # none of the test's processes is left with us.
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            left = {p for p in our_children() if p in self._pids or self._writes_here(p)}
            if not left or time.monotonic() > deadline:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(POLL)


    def _writes_here(self, pid: int) -> bool:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{self.tmp}/"):
                    return True
        return False


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


def our_children() -> set[int]:
    """Live processes whose parent is this pytest process (we are a child subreaper)."""
    me = str(os.getpid())
    kids = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[1] == me and fields[0] not in "ZX":
            kids.add(int(name))
    return kids


def shown_fds(harness: Harness, pid: int, images: Path) -> list[dict[str, Any]]:
    """Dump ``pid`` into ``images`` with --leave-running; the fds `ckpt show --json` lists."""
    harness.dump(pid, images, "--leave-running")
    res = run_ckpt("show", images, "--json")
    assert_ckpt_ok(res)
    fds: list[dict[str, Any]] = json.loads(res.stdout)["processes"][0]["fds"]
    return fds


NOBODY_PYTHON = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                 "/usr/bin/python3")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory uid 65534 can reach (pytest's tmp_path is root's 0700), and a target
    prefix running examples/targets as uid 65534 (the system's python: the venv's is
    under /root) is usable."""
    require_reachable_by_others()
    if shutil.which(NOBODY_PYTHON[0]) is None or not os.path.exists(NOBODY_PYTHON[-1]):
        pytest.skip("needs setpriv and /usr/bin/python3")
    path = Path(tempfile.mkdtemp(prefix="ckpt-open-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Asker:
    """Talks to a target built on examples/targets/fdkit.py: :meth:`ask` makes it print
    its check once more and returns the answer. ``nobody_in``: run it as uid 65534 (with
    NOBODY_PYTHON), its control files in this directory (an ``open_dir``)."""

    def __init__(self, harness: Harness, target: str, *args: str,
                 pass_fds: Sequence[int] = (), prefix: Sequence[str] = (),
                 nobody_in: Path | None = None) -> None:
        self.control = (nobody_in or harness.tmp) / f"{target}.control"
        self.out = harness.tmp / f"{target}.out"
        argv = ([*NOBODY_PYTHON, str(TARGETS / target)] if nobody_in is not None
                else py_target(target))
        self.proc = harness.launch([*prefix, *argv, str(self.control), *args],
                                   self.out, pass_fds)
        wait_for_line(self.out, lambda line: line == "ready", 10, "ready")
        self.asked = 0

    def ask(self, timeout: float = 10.0) -> object:
        self.asked += 1
        self.control.with_name(f"{self.control.name}.{self.asked}").touch()
        lines = wait_for_lines(self.out, self.asked + 1, timeout)
        return json.loads(lines[self.asked])


# --------------------------------------------------------------------------- process trees


@dataclass(frozen=True)
class Member:
    """One process of a tree, as /proc/PID/stat shows it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    comm: str


def read_member(pid: int) -> Member | None:
    """/proc/PID/stat of pid as a Member; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = stat[stat.find("(") + 1:stat.rfind(")")]
    fields = stat[stat.rfind(")") + 2:].split()
    return Member(pid, int(fields[1]), int(fields[2]), int(fields[3]), fields[0], comm)


def tree_members(root: int) -> list[Member]:
    """root and all its descendants (zombies included) in pre-order, children by pid."""
    found: list[Member] = []
    todo = [root]
    while todo:
        member = read_member(todo.pop())
        if member is None:
            continue
        found.append(member)
        kids: set[int] = set()
        for tid in thread_ids(member.pid):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{member.pid}/task/{tid}/children").read_text()
                kids.update(int(k) for k in text.split())
        todo.extend(sorted(kids, reverse=True))
    return found


def tree_ids(root: int) -> set[tuple[int, int, int, int]]:
    """(pid, ppid, pgid, sid) of every member of root's tree, the root's ppid as 0 (a
    restored root's parent is whoever restored it)."""
    return {(m.pid, 0 if m.pid == root else m.ppid, m.pgid, m.sid)
            for m in tree_members(root)}


def wait_for_tree(harness: Harness, root: int, size: int, timeout: float = 20.0
                  ) -> list[Member]:
    """Wait until root's tree has ``size`` members; return them, each killed at teardown
    (killing the root alone would leave the others running)."""

    def grown() -> list[Member] | None:
        members = tree_members(root)
        for member in members:
            harness.track(member.pid)
        return members if len(members) == size else None

    return wait_for(grown, timeout, f"{size} processes in the tree of {root}")


def reap_gone(pids: Sequence[int], timeout: float = 10.0) -> None:
    """Wait until none of pids exists, reaping those that are (or were reparented to)
    our children, as a shell would (we are a child subreaper)."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left:
        for pid in sorted(left):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not Path(f"/proc/{pid}").exists():
                left.discard(pid)
        if left and time.monotonic() > deadline:
            pytest.fail(f"processes {sorted(left)} still exist {timeout:.0f}s after the dump")
        time.sleep(POLL)


def track_tree(harness: Harness, root: int) -> list[Member]:
    """Kill every member of root's tree at teardown; return the members."""
    members = tree_members(root)
    for member in members:
        harness.track(member.pid)
    return members


def dump_tree(harness: Harness, proc: subprocess.Popen[bytes], how: str,
              between: Callable[[], None] = lambda: None, flags: Sequence[str] = ()) -> Path:
    """Dump the tree of ``proc`` (killing it): ``how`` is "dump" (plain), or
    "predump+incremental" (a predump, ``between``, then `dump --incremental` on top),
    with ``flags`` (e.g. --tcp-close) on each pass. Every member is reaped (pids free
    again); return the images to restore."""
    members = [m.pid for m in track_tree(harness, proc.pid)]
    if how == "dump":
        images = harness.images()
    else:
        assert how == "predump+incremental", how
        assert_ckpt_ok(run_ckpt("predump", "-t", str(proc.pid), "-D", harness.images("pre"),
                                *flags))
        between()
        images = harness.images("final")
    extra = () if how == "dump" else ("--incremental", "--prev-images-dir", "../pre")
    harness.dump_and_reap(proc, images, *extra, *flags)
    reap_gone(members)
    forget_gone(harness, members)
    return images


def forget_gone(harness: Harness, pids: Sequence[int]) -> None:
    """Stop tracking dead members: a process another test or engineer forks under one of
    their pids before the restore takes it is then someone else's (the restore is
    skipped as a PID race, see Harness.skip_if_ids_reused), not a leftover of ours."""
    harness._pids.difference_update(pid for pid in pids if read_member(pid) is None)


def restore_tree(harness: Harness, images: Path, before: set[tuple[int, int, int, int]]
                 ) -> int:
    """Restore a dumped tree detached; assert it is back with every member's pid, ppid,
    pgid and sid as ``before`` (tree_ids of the dumped root); return the root's pid."""
    root = harness.restore_detached(images)
    track_tree(harness, root)
    assert tree_ids(root) == before
    return root


def assert_tree_untraced(members: Sequence[Member]) -> None:
    """Every live member of a tree runs on, untraced (zombies stay zombies)."""
    for member in members:
        if member.state != "Z":
            assert_running_untraced(member.pid)
        else:
            now = read_member(member.pid)
            assert now is not None and now.state == "Z", f"zombie {member.pid}: {now}"


@contextlib.contextmanager
def reaping(pids: Sequence[int]) -> Iterator[None]:
    """While the block runs (a `ckpt migrate` that kills a tree, then restores it on this
    host under the same pids), reap each of pids as soon as it is our dead child: killed
    members are reparented to us (a child subreaper) and would hold their pids as zombies.
    A pid that is gone, or reaped once, is left alone from then on."""
    import threading

    left = set(pids)
    stop = threading.Event()

    def loop() -> None:
        while left and not stop.is_set():
            for pid in sorted(left):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        left.discard(pid)
                except ChildProcessError:
                    if not Path(f"/proc/{pid}").exists():
                        left.discard(pid)
            time.sleep(POLL / 4)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# How tree tests checkpoint: a plain dump, and a predump with `dump --incremental` on top.
TREE_HOWS = ["dump", "predump+incremental"]


def kill_tree(root: int) -> None:
    """SIGKILL root first, then every process of its tree as it was: a master that
    replaces a worker it sees die (nginx, a multiprocessing Pool) must not outlive its
    workers, or it forks one no teardown knows of. Use it as a finalizer (it runs before
    the harness's cleanup, which then reaps them)."""
    members = tree_members(root)
    for member in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member.pid, signal.SIGKILL)
