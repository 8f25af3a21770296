"""Built-in demo: start a CPython counter, checkpoint it, restore it, show it counted on.

    python examples/demo.py        (as root, with ckpt installed)

The counter writes one numbered line every 50 ms to a file. The demo dumps it (which kills
it), restores it from the images, and checks that the numbers continue with no gap and no
repeat, from the same PID, in the same file.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUM = re.compile(rb"n=(\d+)")


def numbers(path: Path) -> list[int]:
    return [int(m.group(1)) for m in NUM.finditer(path.read_bytes())]


def wait_for(path: Path, count: int, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = numbers(path)
        if len(got) >= count:
            return got
        time.sleep(0.05)
    sys.exit(f"demo: the counter did not reach {count} lines in {path}")


def ckpt(*args: str) -> None:
    print("$ ckpt " + " ".join(args), flush=True)
    subprocess.run(["ckpt", *args], check=True)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ckpt-demo-"))
    out = work / "counter.out"
    with open(out, "wb") as f:
        target = subprocess.Popen([sys.executable, str(HERE / "targets" / "counter.py")],
                                 stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                 close_fds=True, start_new_session=True)
    pid = target.pid
    restored = 0
    try:
        before = wait_for(out, 10)
        print(f"counter running as pid {pid}, at n={before[-1]}")
        ckpt("dump", "-t", str(pid), "-D", str(work / "images"))
        target.wait()  # reap it so its pid is free for the restore
        at_dump = numbers(out)
        print(f"dumped at n={at_dump[-1]}; the process is gone")
        ckpt("show", str(work / "images"))
        ckpt("restore", "-D", str(work / "images"), "--restore-detached",
             "--pidfile", str(work / "pid"))
        restored = int((work / "pid").read_text())
        after = wait_for(out, len(at_dump) + 10)
        ok = after == list(range(after[0], after[0] + len(after)))
        print(f"restored as pid {restored}, now at n={after[-1]}: "
              + ("continued with no gap and no repeat" if ok else "SEQUENCE BROKEN"))
        sys.exit(0 if ok and restored == pid else 1)
    finally:
        for p in {pid, restored} - {0}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        print(f"(images and output left in {work})")


if __name__ == "__main__":
    main()
