"""The second stage of a pipeline: reads tree_producer.py's lines from stdin and writes
one line per input line to stdout, ``N F(N)`` (see :func:`transform`), one write(2)
each, about 500 lines a second: slower than the producer, so the pipe between them stays
full. A test checks its output with :func:`transform` too: line i must be transform(i).

usage: tree_filter.py
"""

from __future__ import annotations

import os
import sys
import time


def transform(n: int) -> str:
    """What the filter writes for input line n (without the newline)."""
    return f"{n:09d} {n * n % 1000003:07d} {sum(map(int, str(n))):02d}"


def main() -> None:
    for line in sys.stdin.buffer:
        os.write(1, (transform(int(line)) + "\n").encode())
        time.sleep(0.002)


if __name__ == "__main__":
    main()
