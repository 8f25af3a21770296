"""Apply a chain of passes to one warm restore, as a migration's destination does, and
finish it from the last one: `python warm_restore.py PASS... FINAL`; prints the pid."""

from __future__ import annotations

import sys

from ckpt.restore.warm import WarmRestore


def main(paths: list[str]) -> None:
    warm = WarmRestore()
    for path in paths[:-1]:
        done = warm.apply(path)
        print(f"applied {done}", file=sys.stderr)
    pid, _ = warm.finish(paths[-1])
    print(pid)


if __name__ == "__main__":
    main(sys.argv[1:])
