"""Big-memory target: a 64 MiB buffer whose exact bytes must survive a checkpoint.

The buffer is filled from SHAKE-128 with a fixed seed; iteration i flips a few bytes at
positions derived from i, then prints the SHA-256 of the whole buffer:

    iter=<i> sum=<sha256 hex>

The output depends only on i, so a fresh run with --iters N prints the reference lines.
usage: bigmem.py [--iters N] [--mib M] [--period SECONDS]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

SEED = b"ckpt-bigmem-v1"
FLIPS_PER_ITER = 16


def mutate(buf: bytearray, i: int) -> None:
    size = len(buf)
    for j in range(FLIPS_PER_ITER):
        pos = (i * 2654435761 + j * 40503 * 4099) % size
        buf[pos] = (buf[pos] + i + j + 1) & 0xFF


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=0, help="stop after N iterations (0: never)")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--period", type=float, default=0.05)
    args = ap.parse_args()
    buf = bytearray(hashlib.shake_128(SEED).digest(args.mib << 20))
    i = 0
    while args.iters == 0 or i < args.iters:
        i += 1
        mutate(buf, i)
        sys.stdout.write(f"iter={i} sum={hashlib.sha256(buf).hexdigest()}\n")
        sys.stdout.flush()
        if args.iters == 0 or i < args.iters:
            time.sleep(args.period)


if __name__ == "__main__":
    main()
