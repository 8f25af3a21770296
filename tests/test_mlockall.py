"""mlockall(MCL_FUTURE) leaves no trace in /proc: the dump asks the frozen process with a
mapping of its own (ckpt/collect/mlockall.py) and refuses it, naming it; MCL_CURRENT alone
is only its mappings' "lo", restored."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_one_error_line,
    assert_running_untraced,
    needs_root,
    py_target,
    run_ckpt,
    wait_for_lines,
)

from ckpt.collect import mlockall
from ckpt.collect.mlockall import MCL_FUTURE, MCL_ONFAULT, UNKNOWN_ONFAULT


def test_vm_lck_and_the_flags_of_one_mapping() -> None:
    assert mlockall.vm_lck_kb("Name:\tx\nVmLck:\t      12 kB\nVmPin:\t0 kB\n") == 12
    assert mlockall.vm_lck_kb("Name:\tx\n") == 0
    assert mlockall.future_flags(locked=False, present=False) == 0
    assert mlockall.future_flags(locked=True, present=True) == MCL_FUTURE
    assert mlockall.future_flags(locked=True, present=False) == MCL_FUTURE | MCL_ONFAULT


def test_refusals_name_the_flags() -> None:
    assert mlockall.refusal(0) is None
    for flags, says in ((MCL_FUTURE, "mlockall(MCL_FUTURE)"),
                        (MCL_FUTURE | MCL_ONFAULT, "mlockall(MCL_FUTURE | MCL_ONFAULT)"),
                        (MCL_FUTURE | UNKNOWN_ONFAULT, "mlockall(MCL_FUTURE, maybe MCL_ONFAULT)")):
        why = mlockall.refusal(flags)
        assert why is not None and says in why, why


def test_a_mapping_over_the_memlock_limit_is_locked() -> None:
    unmapped: list[int] = []
    flags = mlockall.probe(1, lambda: -errno.EAGAIN, unmapped.append, 4096)
    assert flags == MCL_FUTURE | UNKNOWN_ONFAULT and unmapped == []


def start(harness: Harness, tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / "out"
    proc = harness.launch([*py_target("mlocked.py"), mode], out)
    wait_for_lines(out, 3)
    return proc, out


@needs_root
@pytest.mark.parametrize(("mode", "says"), [
    ("future", "mlockall(MCL_FUTURE): its future mappings are locked"),
    ("onfault", "mlockall(MCL_FUTURE | MCL_ONFAULT)"),
])
def test_mlockall_future_is_refused_and_the_target_runs_on(harness: Harness, tmp_path: Path,
                                                          mode: str, says: str) -> None:
    proc, out = start(harness, tmp_path, mode)
    pid = proc.pid
    maps = Path(f"/proc/{pid}/maps").read_text()
    line = assert_one_error_line(run_ckpt("dump", "-t", str(pid), "-D", harness.images()))
    assert f"process {pid}: it called {says}" in line, line
    assert_running_untraced(pid)
    assert Path(f"/proc/{pid}/maps").read_text() == maps  # the probe's page is gone
    wait_for_lines(out, len(out.read_text().splitlines()) + 2)


@needs_root
def test_mlockall_current_alone_is_restored(harness: Harness, tmp_path: Path) -> None:
    proc, out = start(harness, tmp_path, "current")
    images = harness.images()
    harness.dump_and_reap(proc, images)
    pid = harness.restore_detached(images)
    wait_for_lines(out, len(out.read_text().splitlines()) + 2)
    smaps = Path(f"/proc/{pid}/smaps").read_text()
    assert "lo" in [f for line in smaps.splitlines() if line.startswith("VmFlags:")
                    for f in line.split()[1:]]
