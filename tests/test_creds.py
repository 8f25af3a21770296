"""Credentials and seccomp filters survive dump/restore and migration exactly; a restore
or dump run by another user than root is refused in one line.

The target (examples/targets/seccomp_filtered.py) runs under `setpriv` as uid/gid 65534
with supplementary groups, reduced inheritable/ambient/bounding sets, securebits and
no_new_privs; it installs seccomp filters (uname fails with EOPNOTSUPP; prctl, which ckpt
itself injects at dump and restore, with ENOLINK) and its second thread one more (getppid
fails with ENOTTY), so the threads' credentials differ. It runs
under the system python: the venv's interpreter lives under /root, closed to uid 65534.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TARGETS,
    Bins,
    CkptResult,
    Harness,
    assert_ckpt_ok,
    assert_one_error_line,
    assert_running_untraced,
    is_alive,
    needs_root,
    our_children,
    read_lines,
    require_reachable_by_others,
    run_ckpt,
    thread_ids,
    wait_for,
    wait_for_lines,
)
from test_migrate import start_server

from ckpt.actions.check import meaning
from ckpt.collect.creds import STATUS_KEYS, Creds, parse_creds, read_creds
from ckpt.collect.proc import parse_status
from ckpt.errors import CkptError, ImageError, NotDumpable
from ckpt.freeze.seize import seize_options
from ckpt.images import ImageDir
from ckpt.images.pb import core_pb2 as pb
from ckpt.images.validate import validate
from ckpt.kernel import creds as kcreds
from ckpt.kernel import probe as pr
from ckpt.kernel.probe_creds import probe_creds_restore, probe_seccomp_restore
from ckpt.restore.creds import Prog, expected_creds, plan_creds

FIX = Path(__file__).parent / "fixtures" / "creds" / "proc"
FIX_PID, FIX_WORKER = 17229, 17240
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
CONFINED = [
    "setpriv", "--reuid", "65534", "--regid", "65534", "--groups", "65534,100",
    "--inh-caps", "-all,+net_bind_service,+kill", "--ambient-caps", "+net_bind_service",
    "--bounding-set", "-all,+net_bind_service,+chown,+kill",
    "--securebits", "+noroot,+noroot_locked", "--nnp",
]
# Runs a command under an allow-all seccomp filter of its own (root needs no no_new_privs).
UNDER_SECCOMP = [sys.executable, "-c", """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
insn = ctypes.create_string_buffer(struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000))  # RET ALLOW
prog = ctypes.create_string_buffer(struct.pack("<H6xQ", 1, ctypes.addressof(insn)))
if libc.prctl(ctypes.c_long(22), ctypes.c_long(2), prog) != 0:  # PR_SET_SECCOMP, FILTER
    raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")
os.execvp(sys.argv[1], sys.argv[1:])
"""]
MAIN = re.compile(r"main \d+ uname=(\d+) prctl=(\d+) uid=(\d+)")
WORKER = re.compile(r"worker \d+ getppid=(\d+) uname=(\d+)")


# --------------------------------------------------------------------------- pure parts


def test_parse_creds_fixture() -> None:
    """Status of the confined target, captured live (leader, and the worker thread with
    one more filter)."""
    leader = read_creds(FIX_PID, FIX_PID, root=str(FIX))
    assert leader.uid == leader.gid == (65534,) * 4
    assert leader.groups == (100, 65534)
    assert (leader.cap_inh, leader.cap_prm, leader.cap_eff) == (0x420, 0x400, 0x400)
    assert (leader.cap_bnd, leader.cap_amb) == (0x421, 0x400)
    assert leader.no_new_privs and leader.seccomp_mode == 2 and leader.seccomp_filters == 2
    worker = read_creds(FIX_PID, FIX_WORKER, root=str(FIX))
    assert worker.seccomp_filters == 3 and worker != leader


def test_missing_credential_line_is_refused(tmp_path: Path) -> None:
    text = (FIX / str(FIX_PID) / "task" / str(FIX_PID) / "status").read_text()
    cut = "".join(line for line in text.splitlines(keepends=True)
                  if not line.startswith("CapAmb:"))
    with pytest.raises(ValueError, match="CapAmb"):
        parse_creds(cut)
    task = tmp_path / "7" / "task" / "7"
    task.mkdir(parents=True)
    (task / "status").write_text(cut)
    with pytest.raises(NotDumpable, match="CapAmb"):
        read_creds(7, 7, root=str(tmp_path))
    assert set(status_lines(text)) == set(STATUS_KEYS)


@pytest.mark.parametrize(("line", "options"), [
    ("Seccomp:\t2", kcreds.PTRACE_O_SUSPEND_SECCOMP),
    ("Seccomp:\t1", kcreds.PTRACE_O_SUSPEND_SECCOMP), ("Seccomp:\t0", 0),
    ("", 0)], ids=["filter", "strict", "off", "no-line"])
def test_suspend_seccomp_only_where_needed(line: str, options: int) -> None:
    """PTRACE_O_SUSPEND_SECCOMP (CONFIG_CHECKPOINT_RESTORE, CAP_SYS_ADMIN, a tracer not
    under seccomp) is asked for a task under seccomp only."""
    text = (FIX / str(FIX_PID) / "task" / str(FIX_PID) / "status").read_text()
    text = re.sub(r"^Seccomp:\t\d+$", line, text, flags=re.M)
    assert seize_options(parse_status(text)) == options


def _creds(**kw: int | bool | list[int]) -> pb.Creds:
    base: dict[str, int | bool | list[int]] = dict(
        uid=1000, euid=1001, suid=1002, fsuid=1003, gid=2000, egid=2001, sgid=2002,
        fsgid=2003, groups=[5, 7], cap_inh=0x420, cap_prm=0x401, cap_eff=0x400,
        cap_bnd=0x421, cap_amb=0x400, securebits=0x3, no_new_privs=True, seccomp_mode=2)
    base.update(kw)
    return pb.Creds(**base)  # type: ignore[arg-type]


def test_plan_order() -> None:
    """Privileged steps first, the exact sets last; filters oldest first."""
    filters = [pb.SeccompFilter(program=b"A" * 8), pb.SeccompFilter(program=b"B" * 16, flags=2)]
    calls = plan_creds(_creds(), filters, cap_last=40, full=(1 << 41) - 1)
    names = [c.what for c in calls]

    def at(prefix: str) -> int:
        return next(i for i, n in enumerate(names) if n.startswith(prefix))

    order = ["setgroups", "capset (inheritable)", "raise ambient", "seccomp filter 1",
             "seccomp filter 2", "drop capability", "securebits (keep", "setresgid", "setfsgid",
             "setresuid", "setfsuid", "securebits", "capset", "no_new_privs"]
    positions = [at(p) if p not in ("securebits", "capset") else names.index(p) for p in order]
    assert positions == sorted(positions), names
    assert names[-1] == "no_new_privs"
    progs = [c.args[2] for c in calls if c.nr == kcreds.SYS.seccomp]
    assert progs == [Prog(b"A" * 8), Prog(b"B" * 16)]
    assert [c.args[1] for c in calls if c.nr == kcreds.SYS.seccomp] == [0, 2]
    dropped = [c.args[1] for c in calls if c.what.startswith("drop capability")]
    assert dropped == [c for c in range(41) if c not in (0, 5, 10)]
    raised = [c.args[2] for c in calls if c.what.startswith("raise ambient")]
    assert raised == [10]
    final = next(c for c in calls if c.what == "capset")
    assert final.args[1] == kcreds.cap_data(0x400, 0x401, 0x420)
    ids = {c.what: c.args for c in calls if c.what.startswith("set")}
    assert ids["setresuid"] == (1000, 1001, 1002) and ids["setfsuid"] == (1003,)
    assert ids["setresgid"] == (2000, 2001, 2002) and ids["setfsgid"] == (2003,)
    assert ids["setgroups"] == (2, b"\x05\x00\x00\x00\x07\x00\x00\x00")


def test_plan_strict_and_unfiltered() -> None:
    strict = plan_creds(_creds(seccomp_mode=1, no_new_privs=False), [], 40, (1 << 41) - 1)
    assert strict[-1].what == "strict seccomp"
    assert not any(c.what == "no_new_privs" for c in strict)
    plain = plan_creds(_creds(seccomp_mode=0), [], 40, (1 << 41) - 1)
    assert not any(c.nr == kcreds.SYS.seccomp for c in plain)


def test_expected_creds_ignore_group_order() -> None:
    want = expected_creds(_creds(groups=[7, 5]), 2)
    assert want.groups == (5, 7) and want.seccomp_filters == 2 and want.securebits == 3


def test_image_without_creds_is_refused() -> None:
    """Checked at the image boundary (ckpt.images.validate), before anything is made."""
    entry = pb.ProcessEntry(pid=5, threads=[pb.ThreadCore(tid=5)])
    with pytest.raises(ImageError, match="missing"):
        validate("core-5.img", entry)
    entry.threads[0].creds.CopyFrom(_creds())
    with pytest.raises(ImageError, match="none in seccomp filter mode"):
        validate("core-5.img", entry)
    entry.threads[0].seccomp_filters.add(program=b"x" * 12)
    with pytest.raises(ImageError, match="12 bytes"):
        validate("core-5.img", entry)
    entry.threads[0].seccomp_filters[0].program = b"x" * 8
    validate("core-5.img", entry)
    entry.threads[0].creds.cap_eff = 1 << 63
    with pytest.raises(ImageError, match="cap_eff"):
        validate("core-5.img", entry)


def test_require_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(CkptError, match=r"^restore needs root"):
        kcreds.require_root("restore")
    with pytest.raises(CkptError, match=r"^dump needs root"):
        kcreds.require_root("dump")


def test_check_meaning_of_creds_features() -> None:
    for ok in (True, False):
        feats = tuple(pr.Feature(n, ok, "x") for n in pr.FEATURE_NAMES)
        lines = meaning(pr.Capabilities(feats))
        creds = [line for line in lines if "credentials" in line]
        seccomp = [line for line in lines if "seccomp" in line]
        assert len(creds) == len(seccomp) == 1, lines
        assert ("refused" in creds[0] + seccomp[0]) is not ok, lines


@needs_root
def test_probes_here() -> None:
    """This machine (root, CONFIG_CHECKPOINT_RESTORE=y) allows both; nothing is left."""
    assert probe_creds_restore()[0]
    assert probe_seccomp_restore()[0]


@needs_root
def test_check_as_root_and_as_nobody() -> None:
    res = run_ckpt("check")
    assert_ckpt_ok(res)
    assert re.search(r"^ok  creds-restore ", res.stdout, re.M), res.stdout
    assert re.search(r"^ok  seccomp-restore ", res.stdout, re.M), res.stdout
    res = run_as_nobody("check")
    assert re.search(r"^NO  creds-restore .*not root", res.stdout, re.M), res.describe()
    assert re.search(r"^NO  seccomp-restore .*CAP_SYS_ADMIN", res.stdout, re.M), res.describe()
    assert "restore: refused: credentials cannot be restored here" in res.stdout


# --------------------------------------------------------------------------- live


def _system_python() -> str:
    require_reachable_by_others()
    if shutil.which("setpriv") is None or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("needs setpriv and /usr/bin/python3")
    return SYSTEM_PYTHON


def launch_confined(harness: Harness, out: Path, variant: str = "setpriv",
                    ) -> subprocess.Popen[bytes]:
    """``setpriv``: under CONFINED (no_new_privs); ``undumpable``: the same, and not
    dumpable; ``dropped``: started as root, filters installed while privileged, then
    root given up (no no_new_privs, no capabilities)."""
    target = [_system_python(), str(TARGETS / "seccomp_filtered.py")]
    argv = {"setpriv": [*CONFINED, *target], "undumpable": [*CONFINED, *target, "--undumpable"],
            "dropped": [*target, "--drop"]}[variant]
    proc = harness.launch(argv, out)
    wait_for(lambda: any(line.endswith("uid=65534") for line in read_lines(out)), 10,
             "the target to run as 65534")
    wait_for_lines(out, len(read_lines(out)) + 2)
    return proc


def status_lines(text: str) -> dict[str, str]:
    """The STATUS_KEYS lines of a status text, as the kernel wrote them."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in STATUS_KEYS:
            out[key] = value.strip()
    return out


def snapshot(pid: int) -> dict[int, dict[str, str]]:
    """tid -> the credential lines of its /proc status."""
    out = {}
    for tid in sorted(thread_ids(pid)):
        out[tid] = status_lines(Path(f"/proc/{pid}/task/{tid}/status").read_text())
    return out


def assert_still_filtered(out: Path, since: int) -> None:
    """Lines written after ``since``: every filter acts, the uid is the confined one."""
    lines = wait_for_lines(out, since + 6)[since:]
    mains = [m.groups() for line in lines if (m := MAIN.fullmatch(line))]
    workers = [m.groups() for line in lines if (m := WORKER.fullmatch(line))]
    assert mains and workers, lines
    assert set(mains) == {("95", "67", "65534")}, lines
    assert set(workers) == {("25", "95")}, lines


def assert_same_core(first: Path, again: Path, pid: int, variant: str) -> None:
    """A second dump of the restored process stores the same credentials, securebits,
    filters (programs, flags, order) and dumpable flag as the first."""
    a, b = ImageDir.open(first).read_core(pid), ImageDir.open(again).read_core(pid)
    assert a.dumpable == b.dumpable == (1 if variant == "setpriv" else 0)
    assert len(a.threads) == len(b.threads) == 2
    for x, y in zip(a.threads, b.threads, strict=True):
        assert x.creds == y.creds
        assert list(x.seccomp_filters) == list(y.seccomp_filters)
    assert a.threads[0].creds.securebits == (0 if variant == "dropped" else 3)  # noroot+lock
    assert a.threads[0].creds.no_new_privs is (variant != "dropped")
    assert [len(t.seccomp_filters) for t in a.threads] == [2, 3]


@needs_root
@pytest.mark.parametrize("variant", ["setpriv", "undumpable", "dropped"])
def test_creds_and_filters_survive_dump_restore(harness: Harness, tmp_path: Path,
                                                variant: str) -> None:
    out = tmp_path / "out.txt"
    proc = launch_confined(harness, out, variant)
    before = snapshot(proc.pid)
    assert before[proc.pid]["Uid"].split() == ["65534"] * 4
    images = harness.images()
    harness.dump_and_reap(proc, images)
    shown = run_ckpt("show", images)
    assert_ckpt_ok(shown)
    assert "credentials: uid=65534,65534,65534,65534" in shown.stdout, shown.stdout
    assert "seccomp=2 (3 filters)" in shown.stdout, shown.stdout
    written = len(read_lines(out))
    pid = harness.restore_detached(images)
    assert snapshot(pid) == before
    assert_still_filtered(out, written)
    assert_running_untraced(pid)
    again = harness.images("again")
    harness.dump(pid, again, "--leave-running")
    assert_same_core(images, again, pid, variant)
    assert snapshot(pid) == before
    assert_still_filtered(out, len(read_lines(out)))


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    token = tmp_path / "token"
    token.write_text("migrate-me\n")
    yield f"127.0.0.1:{start_server(tmp_path / 'dest')}", token


@needs_root
def test_creds_and_filters_survive_migrate(harness: Harness, tmp_path: Path,
                                          page_server: tuple[str, Path]) -> None:
    address, token = page_server
    out = tmp_path / "out.txt"
    proc = launch_confined(harness, out)
    before = snapshot(proc.pid)
    res = run_ckpt("migrate", "-t", str(proc.pid), "--to", address, "--auth-token-file", token,
                   reap=proc)
    assert res.returncode == 0, res.describe()
    assert "(warm)" in res.stdout, res.stdout  # the warm restore path applied them
    new_pid = int(re.search(r"as pid (\d+)", res.stdout)[1])  # type: ignore[index]
    harness.track(new_pid)
    proc.wait(timeout=10)
    assert list(snapshot(new_pid).values()) == list(before.values())
    assert_still_filtered(out, len(read_lines(out)))
    assert_running_untraced(new_pid)


# --------------------------------------------------------------------------- not root


def run_as_nobody(*args: str | Path) -> CkptResult:
    """The ckpt CLI run as uid/gid 65534 by the system python over this checkout and the
    venv's packages (the venv's own interpreter is not reachable by that user)."""
    python = _system_python()
    if subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                      capture_output=True, text=True, check=True).stdout.strip() != \
            str(sys.version_info[:2]):
        pytest.skip("the system python is another version than the venv's")
    path = f"{ROOT}:{sysconfig.get_paths()['purelib']}:{sysconfig.get_paths()['platlib']}"
    argv = [str(a) for a in args]
    proc = subprocess.run([*NOBODY, "env", f"PYTHONPATH={path}", python, "-c",
                           "from ckpt.cli import run; run()", *argv],
                          capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)
    return CkptResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


@needs_root
def test_restore_by_non_root_is_refused(harness: Harness, bins: Bins, tmp_path: Path,
                                        open_dir: Path) -> None:
    """Readable images of a root process: another user may not restore them (today:
    `internal error: PermissionError`), with or without --new-pid."""
    proc = harness.launch([bins.counter_dyn], tmp_path / "out.txt")
    wait_for_lines(tmp_path / "out.txt", 2)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    shutil.copytree(images, open_dir / "img")
    for p in [open_dir / "img", *(open_dir / "img").iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    for extra in ([], ["--new-pid"]):
        res = run_as_nobody("restore", "-D", open_dir / "img", "--restore-detached", *extra)
        message = assert_one_error_line(res)
        assert "restore needs root" in message, message
    assert not is_alive(proc.pid)


@needs_root
def test_dump_by_non_root_is_refused(harness: Harness, bins: Bins, tmp_path: Path,
                                     open_dir: Path) -> None:
    """A user's own process: dump, predump and migrate as that user say they need root;
    the process runs on untouched."""
    out = tmp_path / "out.txt"
    proc = harness.launch([*NOBODY, bins.sleeper, "sleep", "1"], out)
    wait_for_lines(out, 1)
    for action in ("dump", "predump"):
        res = run_as_nobody(action, "-t", str(proc.pid), "-D", open_dir / action)
        message = assert_one_error_line(res)
        assert f"{action} needs root" in message, message
    token = open_dir / "token"
    token.write_text("t\n")
    token.chmod(0o644)
    res = run_as_nobody("migrate", "-t", str(proc.pid), "--to", "127.0.0.1:9",
                        "--auth-token-file", token)
    message = assert_one_error_line(res)
    assert "migrate needs root" in message, message
    assert_running_untraced(proc.pid)


@needs_root
def test_failed_credential_step_kills_the_stub(harness: Harness, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A step the kernel refuses fails the restore: a clear error, and the half-built
    process (two threads, traced) is killed and reaped, never let go without its
    credentials."""
    import ckpt.restore.creds as rcreds
    from ckpt.actions.restore import RestoreOptions, restore
    from ckpt.errors import RestoreError

    out = tmp_path / "out.txt"
    proc = launch_confined(harness, out)
    images = harness.images()
    harness.dump_and_reap(proc, images)
    real = rcreds.plan_creds

    def refused(*args: object, **kwargs: object) -> list[rcreds.Call]:
        bad = rcreds.Call("capset with a bad header", kcreds.SYS.capset, (b"\0" * 8, 0))
        return [*real(*args, **kwargs), bad]  # type: ignore[arg-type]

    monkeypatch.setattr(rcreds, "plan_creds", refused)
    written = len(read_lines(out))
    # a new pid: which one is beside the point, and the dumped one may be taken meanwhile
    kids = our_children()
    with pytest.raises(RestoreError, match="capset with a bad header"):
        restore(RestoreOptions(images_dir=str(images), new_pid=True))
    assert our_children() == kids  # the stub was killed and reaped, not a zombie
    monkeypatch.undo()
    # every step succeeds but the result is not what the image says: refused as well
    want = rcreds.expected_creds

    def other(*args: object) -> Creds:
        return dataclasses.replace(want(*args), uid=(1, 1, 1, 1))  # type: ignore[arg-type]

    monkeypatch.setattr(rcreds, "expected_creds", other)
    with pytest.raises(RestoreError, match=r"other credentials than dumped: uid"):
        restore(RestoreOptions(images_dir=str(images), new_pid=True))
    assert our_children() == kids
    assert len(read_lines(out)) == written


@needs_root
def test_dump_by_ckpt_under_seccomp(harness: Harness, bins: Bins, tmp_path: Path) -> None:
    """ckpt under a seccomp filter of its own cannot suspend a target's filters (EPERM): a
    target without seccomp dumps as ever; a filtered one is refused in one line and runs
    on, untraced and still filtered."""
    out = tmp_path / "plain.txt"
    plain = harness.launch([bins.sleeper, "sleep", "1"], out)
    wait_for_lines(out, 1)
    res = run_ckpt("dump", "-t", str(plain.pid), "-D", harness.images("plain"),
                   "--leave-running", prefix=UNDER_SECCOMP)
    assert_ckpt_ok(res)
    assert_running_untraced(plain.pid)
    out = tmp_path / "confined.txt"
    confined = launch_confined(harness, out)
    res = run_ckpt("dump", "-t", str(confined.pid), "-D", harness.images("confined"),
                   prefix=UNDER_SECCOMP)
    message = assert_one_error_line(res)
    assert "is under seccomp" in message and "CAP_SYS_ADMIN" in message, message
    assert_running_untraced(confined.pid)
    assert_still_filtered(out, len(read_lines(out)))


@needs_root
def test_dump_in_other_user_namespace_is_refused(harness: Harness, bins: Bins,
                                                 tmp_path: Path) -> None:
    """Root in a user namespace of its own has every capability there, and /proc shows
    them as they count there: restored here as read, they would count over ckpt's
    namespace. Refused before the freeze, the process untouched."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    out = tmp_path / "out.txt"
    proc = harness.launch(["unshare", "-U", "-r", bins.sleeper, "sleep", "1"], out)
    wait_for_lines(out, 1)
    assert Path(f"/proc/{proc.pid}/status").read_text().count("CapEff:\t000001ff") == 1
    res = run_ckpt("dump", "-t", str(proc.pid), "-D", harness.images())
    message = assert_one_error_line(res)
    assert "runs in a user namespace other than ckpt's" in message, message
    assert_running_untraced(proc.pid)
