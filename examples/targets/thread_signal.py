"""thread_signal: a signal directed at one thread, blocked there, must stay pending for
that thread across a checkpoint, and be handled once when the thread unblocks it.

A worker thread blocks SIGUSR1; the main thread sends it one with pthread_kill (tgkill:
si_code SI_TKILL, which only the target thread itself may queue again with
rt_tgsigqueueinfo). Once the file TRIGGER exists the worker unblocks SIGUSR1, and the
handler counts it. Lines:

    worker <tid>                 once the signal is pending for the worker
    handled=<count>              every 50 ms, from the main thread

usage: thread_signal.py TRIGGER
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

count = 0


def on_usr1(signo: int, frame: object) -> None:
    global count
    count += 1


def worker(trigger: str, ready: threading.Event) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    ready.set()
    while not os.path.exists(trigger):
        time.sleep(0.01)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    while True:
        time.sleep(1)


def main() -> None:
    signal.signal(signal.SIGUSR1, on_usr1)
    ready = threading.Event()
    t = threading.Thread(target=worker, args=(sys.argv[1], ready), daemon=True)
    t.start()
    ready.wait()
    assert t.ident is not None
    signal.pthread_kill(t.ident, signal.SIGUSR1)
    print(f"worker {t.native_id}", flush=True)
    while True:
        print(f"handled={count}", flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
