"""The freezer always lets go: ckpt interrupted by SIGINT/SIGTERM, or killed outright,
while the target is frozen, leaves the target running, untraced, with its memory intact,
and no half-written image behind."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    Harness,
    assert_running_untraced,
    ckpt_command,
    needs_root,
    proc_status,
    py_target,
    read_lines,
    wait_for,
    wait_for_lines,
)

pytestmark = needs_root


def traced(pid: int) -> bool:
    status = proc_status(pid)
    return status is not None and status.get("TracerPid", "0") != "0"


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_target_survives_ckpt_interrupted_while_frozen(harness: Harness, tmp_path: Path,
                                                       signo: int) -> None:
    out = tmp_path / "bigmem.out"
    target = harness.launch([*py_target("bigmem.py"), "--mib", "64", "--period", "0.05"], out)
    wait_for_lines(out, 3, timeout=30)
    images = harness.images()
    errf = tmp_path / "ckpt.err"
    with open(errf, "wb") as err:
        # zstd level 19 makes the copy slow enough to interrupt it mid-way.
        ckpt = subprocess.Popen([ckpt_command(), "dump", "-t", str(target.pid), "-D",
                                 str(images), "--compress-level", "19"],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        wait_for(lambda: traced(target.pid), timeout=30, what="ckpt to freeze the target")
        time.sleep(0.2)
        assert ckpt.poll() is None, "dump finished before it could be interrupted"
        ckpt.send_signal(signo)
        rc = ckpt.wait(timeout=30)
    finally:
        if ckpt.poll() is None:
            ckpt.kill()
            ckpt.wait()
    assert rc != 0
    stderr = errf.read_text()
    if signo != signal.SIGKILL:
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:"), stderr
        assert "interrupted" in lines[0]
        assert not list(images.iterdir()), f"left in images dir: {list(images.iterdir())}"
    assert target.poll() is None, "the target died"
    assert_running_untraced(target.pid)
    # Still computing the same digests as before: its memory was not disturbed.
    before = len(read_lines(out))
    lines = wait_for_lines(out, before + 3, timeout=30)
    iters = [int(line.split()[0].split("=")[1]) for line in lines]
    assert iters == list(range(iters[0], iters[0] + len(iters)))
