"""The first stage of a pipeline: writes lines 1, 2, 3, ... (``%09d``) to stdout as fast
as the pipe takes them, each line in one write(2), so it spends its life blocked on a full
pipe. tree_filter.py reads them.

usage: tree_producer.py
"""

from __future__ import annotations

import os


def main() -> None:
    n = 0
    while True:
        n += 1
        os.write(1, b"%09d\n" % n)


if __name__ == "__main__":
    main()
