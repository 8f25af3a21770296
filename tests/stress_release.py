"""Stress, outside the suite: restore one pauser image N times, send SIGUSR1 the moment each
restore returns, and count the restored processes whose pause() did not return EINTR (the
handler ran before a rewound pause() that then slept on: the release race of
ckpt.restore.release). Exit status 1 if any did.

    sudo .venv/bin/python tests/stress_release.py [N] [pause|cold|thread]

``cold`` (the default) restores a static pauser whose pages are dropped from the page cache
before each restore, which widens the window to a major fault (see
tests/test_signal_restore.py: evict); ``pause`` and ``thread`` are the plain dynamic pauser.
With CKPT_TEST_SIGNAL_AT=resumed:10 in the environment ckpt sends SIGUSR1 itself as it
resumes the process (ckpt/testpoint.py), and this script does not.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from test_signal_restore import evict  # (this folder is sys.path[0])

from ckpt.actions.restore import RestoreOptions, restore

TARGET = Path(__file__).resolve().parent.parent / "examples" / "targets" / "pauser.c"
PR_SET_CHILD_SUBREAPER = 36


def answered(out: Path, want: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if want in out.read_text():
            return True
        time.sleep(0.005)
    return False


def kill_and_reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def main(n: int, mode: str) -> int:
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # restored ones are ours
    tmp = Path(tempfile.mkdtemp(prefix="stress-release-"))
    binary = tmp / "pauser"
    static = ["-static"] if mode == "cold" else []
    subprocess.run(["gcc", "-O2", "-pthread", *static, "-o", binary, TARGET], check=True)
    out = tmp / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen([binary, mode],
                                stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                start_new_session=True)
    assert answered(out, "ready", 10)
    time.sleep(0.2)  # every thread into pause()
    images = tmp / "images"
    images.mkdir()
    ckpt = Path(sys.executable).parent / "ckpt"
    subprocess.run([ckpt, "dump", "-t", str(proc.pid), "-D", images], check=True)
    proc.wait()
    missed = 0
    for i in range(n):
        if mode == "cold":
            evict(binary)
        pid = restore(RestoreOptions(images_dir=str(images), new_pid=True,
                                     skip_file_check=True)).pid
        if not os.environ.get("CKPT_TEST_SIGNAL_AT"):
            os.kill(pid, signal.SIGUSR1)
        want = f"woke=1 errno=4 usr1=1 trap=0 pid={pid}"
        if not answered(out, want, 2):
            missed += 1
            print(f"restore {i}: pid {pid} did not answer", flush=True)
        kill_and_reap(pid)
    shutil.rmtree(tmp)
    print(f"{missed} of {n} restores missed the signal ({mode})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200,
                  sys.argv[2] if len(sys.argv) > 2 else "cold"))
