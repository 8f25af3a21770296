"""pstate: POSIX timers and prctl settings a restore must bring back, reported on request.

Set up once (both threads block SIGUSR1 and SIGRTMIN+2 and take them with sigtimedwait,
which gives the siginfo's timer id and value):

    process    child subreaper, THP disabled, MDWE (refuse exec gain), timer slack 123456
               (main thread), SCHED_BATCH with SCHED_RESET_ON_FORK and I/O priority
               best-effort 3 (main thread)
    worker     named "pst-worker", timer slack 654321, MCE kill policy early, nice 7, on
               CPU 0 only
    timers     ids 0..4 created, 1 and 3 deleted again (ids with gaps):
                 0  CLOCK_MONOTONIC, SIGUSR1 to the process, value 0x1111, fires once
                    after DELAY seconds
                 2  CLOCK_BOOTTIME, SIGRTMIN+2 to the worker (SIGEV_THREAD_ID), value
                    0x2222, fires once after DELAY seconds
                 4  CLOCK_REALTIME, SIGEV_NONE, value 0x4444, every 1000 s
               then 5, CLOCK_PROCESS_CPUTIME_ID, SIGEV_NONE, never armed, and
                 6  CLOCK_MONOTONIC, SIGRTMIN+3 to the process, every 20 ms: its signal is
                    taken once after 200 ms (about 9 overruns), then left pending
                 7  CLOCK_MONOTONIC, SIGRTMIN+5 to the process, every 20 ms: its signal
                    is never taken (pending from the first expiry on; no overrun count)

Lines:
    ready <worker tid>
    fired <thread> id=<si_timerid> signo=<n> value=<hex> overrun=<n>  (thread: main, worker)
    report <thread> <name>=<value> ...                                 on each request

A request is the file ASK getting a new size (append a byte to it). Timers in the main
thread's report: t<id>=<interval_ns>/<value_ns>/<overrun> (timer_gettime,
timer_getoverrun). If the byte appended is "d", the main thread's report ends with
queued7=<n>: how many SIGRTMIN+5 signals were queued (it takes them all).

Further arguments add what a dump must refuse:
    cpu-overrun  8  CLOCK_PROCESS_CPUTIME_ID, SIGRTMIN+4 to the process, every 1 ms of
                    CPU time: its signal is taken once after 50 ms of CPU (overruns on a
                    CPU clock, which a restore cannot replay)
    sud          syscall user dispatch on in the main thread (its selector says allow)
    pdeath       parent-death signal SIGURG in the worker (the parent it fires for is
                 not restored: the restored process's parent is ckpt)

usage: pstate.py ASK DELAY [cpu-overrun] [sud] [pdeath]
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR_GETTID, NR_TIMER_CREATE, NR_TIMER_DELETE = 186, 222, 226
NR_TIMER_SETTIME, NR_TIMER_GETTIME, NR_TIMER_GETOVERRUN = 223, 224, 225
SIGUSR1, SIGURG, SIGRT2, SIGRT3, SIGRT4, SIGRT5 = 10, 23, 36, 37, 38, 39
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID = 0, 1, 4
CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID, CLOCK_BOOTTIME = 0, 1, 2, 7
PR_SET_NAME, PR_GET_NAME = 15, 16
PR_SET_PDEATHSIG, PR_GET_PDEATHSIG, PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 1, 2, 29, 30
PR_MCE_KILL, PR_MCE_KILL_GET, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY = 33, 34, 1, 1
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE, PR_SET_MDWE, PR_GET_MDWE = 41, 42, 65, 66
SIG_BLOCK = 0
PR_SET_SYSCALL_USER_DISPATCH, PR_SYS_DISPATCH_ON = 59, 1
SELECTOR = ctypes.c_char(b"\0")  # SYSCALL_DISPATCH_FILTER_ALLOW
SCHED_RESET_ON_FORK, NR_IOPRIO_SET, IOPRIO_WHO_PROCESS = 0x40000000, 251, 1
IOPRIO_BE_3 = 2 << 13 | 3
NSEC = 1_000_000_000
out_lock = threading.Lock()


def sc(nr: int, *args: int | ctypes.c_void_p) -> int:
    res = int(libc.syscall(ctypes.c_long(nr), *(a if isinstance(a, ctypes.c_void_p)
                                                 else ctypes.c_long(a) for a in args)))
    if res == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"syscall {nr}: {os.strerror(err)}")
    return res


def prctl(*args: int) -> int:
    res = int(libc.prctl(*(ctypes.c_ulong(a) for a in args)))
    if res == -1:
        raise OSError(ctypes.get_errno(), f"prctl{args}")
    return res


def prctl_int(option: int) -> int:
    value = ctypes.c_int(0)
    libc.prctl(ctypes.c_int(option), ctypes.byref(value), 0, 0, 0)
    return value.value


def say(line: str) -> None:
    with out_lock:
        print(line, flush=True)


def sigset(*signals: int) -> ctypes.Array[ctypes.c_char]:
    mask = sum(1 << (s - 1) for s in signals)
    return ctypes.create_string_buffer(mask.to_bytes(8, "little") + bytes(120))


def block(*signals: int) -> None:
    if libc.pthread_sigmask(SIG_BLOCK, sigset(*signals), None) != 0:
        raise OSError("pthread_sigmask")


def wait_timer_signal(who: str, signo: int) -> None:
    """One sigtimedwait of 50 ms; a timer's siginfo is printed."""
    info = ctypes.create_string_buffer(128)
    timeout = (ctypes.c_long * 2)(0, 50_000_000)
    got = libc.sigtimedwait(sigset(signo), info, timeout)
    if got > 0:
        tid, overrun, value = (int.from_bytes(info.raw[o:o + n], "little", signed=True)
                               for o, n in ((16, 4), (20, 4), (24, 8)))
        say(f"fired {who} id={tid} signo={got} value={value:#x} overrun={overrun}")


def queued(signo: int) -> int:
    """Take every queued instance of ``signo``; how many there were."""
    info, n = ctypes.create_string_buffer(128), 0
    timeout = (ctypes.c_long * 2)(0, 0)
    while libc.sigtimedwait(sigset(signo), info, timeout) > 0:
        n += 1
    return n


def timer_create(clock: int, notify: int, signo: int, value: int, tid: int = 0) -> int:
    ev = ctypes.create_string_buffer(value.to_bytes(8, "little") + signo.to_bytes(4, "little")
                                     + notify.to_bytes(4, "little") + tid.to_bytes(4, "little")
                                     + bytes(44))
    timer = ctypes.c_int(-1)
    sc(NR_TIMER_CREATE, clock, ctypes.c_void_p(ctypes.addressof(ev)),
       ctypes.c_void_p(ctypes.addressof(timer)))
    return timer.value


def timer_set(timer: int, interval_ns: int, value_ns: int) -> None:
    spec = (ctypes.c_long * 4)(*divmod(interval_ns, NSEC), *divmod(value_ns, NSEC))
    sc(NR_TIMER_SETTIME, timer, 0, ctypes.c_void_p(ctypes.addressof(spec)), 0)


def timer_state(timer: int) -> str:
    spec = (ctypes.c_long * 4)()
    sc(NR_TIMER_GETTIME, timer, ctypes.c_void_p(ctypes.addressof(spec)))
    overrun = sc(NR_TIMER_GETOVERRUN, timer)
    return f"{spec[0] * NSEC + spec[1]}/{spec[2] * NSEC + spec[3]}/{overrun}"


def thread_settings() -> str:
    name = ctypes.create_string_buffer(16)
    libc.prctl(ctypes.c_int(PR_GET_NAME), name, 0, 0, 0)
    return (f"name={name.value.decode()} timer_slack={prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)} "
            f"pdeath_signal={prctl_int(PR_GET_PDEATHSIG)} "
            f"mce_kill={prctl(PR_MCE_KILL_GET, 0, 0, 0, 0)}")


class Asked:
    """Has ASK grown since this reader last looked?"""

    def __init__(self, path: str) -> None:
        self.path, self.seen = path, self.size(path)

    @staticmethod
    def size(path: str) -> int:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return 0

    def new(self) -> bool:
        now = self.size(self.path)
        if now == self.seen:
            return False
        self.seen = now
        return True


def worker(ask: str, started: threading.Event, tid: list[int]) -> None:
    tid.append(sc(NR_GETTID))
    libc.prctl(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(b"pst-worker"), 0, 0, 0)
    prctl(PR_SET_TIMERSLACK, 654321, 0, 0, 0)
    if "pdeath" in sys.argv[3:]:
        prctl(PR_SET_PDEATHSIG, SIGURG, 0, 0, 0)
    prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY, 0, 0)
    os.setpriority(os.PRIO_PROCESS, tid[0], 7)
    os.sched_setaffinity(0, {0})  # 0: the calling thread
    asked = Asked(ask)
    started.set()
    while True:
        wait_timer_signal("worker", SIGRT2)
        if asked.new():
            say(f"report worker {thread_settings()}")


def main() -> None:
    ask, delay = sys.argv[1], float(sys.argv[2])
    block(SIGUSR1, SIGRT2, SIGRT3, SIGRT4, SIGRT5)  # before the worker starts: it inherits the mask
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
    prctl(PR_SET_TIMERSLACK, 123456, 0, 0, 0)
    os.sched_setscheduler(0, os.SCHED_BATCH | SCHED_RESET_ON_FORK, os.sched_param(0))
    sc(NR_IOPRIO_SET, IOPRIO_WHO_PROCESS, 0, IOPRIO_BE_3)
    started, tid = threading.Event(), []
    threading.Thread(target=worker, args=(ask, started, tid), daemon=True).start()
    started.wait()
    ids = [timer_create(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGUSR1, 0x1111),
           timer_create(CLOCK_MONOTONIC, SIGEV_NONE, 0, 0),
           timer_create(CLOCK_BOOTTIME, SIGEV_THREAD_ID | SIGEV_SIGNAL, SIGRT2, 0x2222, tid[0]),
           timer_create(CLOCK_MONOTONIC, SIGEV_NONE, 0, 0),
           timer_create(CLOCK_REALTIME, SIGEV_NONE, 0, 0x4444),
           timer_create(CLOCK_PROCESS_CPUTIME_ID, SIGEV_NONE, 0, 0x5555)]
    assert ids == [0, 1, 2, 3, 4, 5], ids
    sc(NR_TIMER_DELETE, 1)
    sc(NR_TIMER_DELETE, 3)
    timer_set(0, 0, int(delay * NSEC))
    timer_set(2, 0, int(delay * NSEC))
    timer_set(4, 1000 * NSEC, 1000 * NSEC)
    assert timer_create(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRT3, 0x6666) == 6
    timer_set(6, 20_000_000, 20_000_000)
    time.sleep(0.2)
    wait_timer_signal("main", SIGRT3)
    assert timer_create(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRT5, 0x7777) == 7
    timer_set(7, 20_000_000, 20_000_000)
    if "cpu-overrun" in sys.argv[3:]:
        assert timer_create(CLOCK_PROCESS_CPUTIME_ID, SIGEV_SIGNAL, SIGRT4, 0x8888) == 8
        timer_set(8, 1_000_000, 1_000_000)
        spin_until = time.process_time() + 0.05
        while time.process_time() < spin_until:
            pass
        wait_timer_signal("main", SIGRT4)
    if "sud" in sys.argv[3:]:
        libc.prctl(ctypes.c_int(PR_SET_SYSCALL_USER_DISPATCH), ctypes.c_ulong(PR_SYS_DISPATCH_ON),
                   ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.byref(SELECTOR))
    prctl(PR_SET_MDWE, 1, 0, 0, 0)  # last: nothing after it maps code
    asked = Asked(ask)
    say(f"ready {tid[0]}")
    while True:
        wait_timer_signal("main", SIGUSR1)
        if asked.new():
            timers = " ".join(f"t{i}={timer_state(i)}" for i in (0, 2, 4, 5, 6))
            with open(ask, "rb") as f:
                drain = f.read()[-1:] == b"d"
            say(f"report main {thread_settings()} "
                f"child_subreaper={prctl_int(PR_GET_CHILD_SUBREAPER)} "
                f"thp_disable={prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0)} "
                f"mdwe={prctl(PR_GET_MDWE, 0, 0, 0, 0)} {timers}"
                + (f" queued7={queued(SIGRT5)}" if drain else ""))
        time.sleep(0)


if __name__ == "__main__":
    main()
