/*
 * pauser: waits for signals in pause() (or in read() on stdin) and says what woke it, so a
 * restore that loses a signal action, a mask or the kernel's syscall-restart rules shows.
 *
 * Actions: SIGUSR1 counted by a handler; SIGTRAP counted by a handler (trap-handler, and
 * trap-blocked, where SIGTRAP is blocked too) or ignored (trap-ignored); SIGINT ignored;
 * SIGHUP blocked; every other signal default (SIGUSR2 kills it). The handlers only count:
 * lines are printed by the main loop.
 *
 * usage: pauser pause [trap-handler|trap-ignored|trap-blocked]
 *   Prints "ready", then pause() in a loop; after each return:
 *     woke=<n> errno=<errno> usr1=<count> trap=<count> pid=<getpid()>
 *   A signal whose handler runs while pause() is not interrupted (a call rewound before
 *   the signal) leaves the process asleep, and no line appears.
 *
 * usage: pauser cold
 *   As pause, but every mapping of its own executable is madvise(MADV_RANDOM) first (the
 *   flag is restored with it): page faults in them read no more than their page, so with
 *   the executable's pages dropped from the page cache, a restore filling its data pages
 *   leaves the page holding pause()'s syscall instruction out (build it -static).
 *
 * usage: pauser thread
 *   The same, but the pause() loop runs in a second thread; the main thread blocks SIGUSR1
 *   and waits in pause() too, so a process-directed SIGUSR1 can only wake the second one.
 *
 * usage: pauser read
 *   The same actions, but SIGUSR1's handler has SA_RESTART and the loop blocks in
 *   read(0): a signal must not end the read. Each read prints
 *     read=<text> usr1=<count>      or      read-error=<errno> usr1=<count>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile sig_atomic_t usr1_count, trap_count;

static void on_usr1(int sig)
{
    (void)sig;
    usr1_count++;
}

static void on_trap(int sig)
{
    (void)sig;
    trap_count++;
}

static void act(int sig, void (*fn)(int), int flags)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) != 0) {
        perror("sigaction");
        _exit(1);
    }
}

static void random_access_self(void)
{
    char exe[4096], line[4096 + 128];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    FILE *maps = fopen("/proc/self/maps", "r");
    if (len < 0 || !maps) {
        perror("maps");
        _exit(1);
    }
    exe[len] = 0;
    while (fgets(line, sizeof line, maps)) {
        unsigned long start, end;
        char *path = strchr(line, '/');
        line[strcspn(line, "\n")] = 0;
        if (path && strcmp(path, exe) == 0 && sscanf(line, "%lx-%lx", &start, &end) == 2 &&
            madvise((void *)start, end - start, MADV_RANDOM) != 0) {
            perror("madvise");
            _exit(1);
        }
    }
    fclose(maps);
}

static void *pause_loop(void *arg)
{
    (void)arg;
    for (long n = 1;; n++) {
        int ret = pause();
        printf("woke=%ld errno=%d usr1=%d trap=%d pid=%d\n", n, ret < 0 ? errno : 0,
               (int)usr1_count, (int)trap_count, (int)getpid());
        fflush(stdout);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "pause";
    const char *trap = argc > 2 ? argv[2] : "trap-handler";
    int reading = strcmp(mode, "read") == 0;
    if (strcmp(mode, "cold") == 0)
        random_access_self();
    act(SIGUSR1, on_usr1, reading ? SA_RESTART : 0);
    act(SIGTRAP, strcmp(trap, "trap-ignored") == 0 ? SIG_IGN : on_trap, 0);
    act(SIGINT, SIG_IGN, 0);
    sigset_t hup;
    sigemptyset(&hup);
    sigaddset(&hup, SIGHUP);
    if (strcmp(trap, "trap-blocked") == 0)
        sigaddset(&hup, SIGTRAP);
    sigprocmask(SIG_BLOCK, &hup, NULL);
    if (strcmp(mode, "thread") == 0) {
        pthread_t worker;
        if (pthread_create(&worker, NULL, pause_loop, NULL) != 0)
            return 1;
        sigset_t usr1;
        sigemptyset(&usr1);
        sigaddset(&usr1, SIGUSR1);
        pthread_sigmask(SIG_BLOCK, &usr1, NULL);
        printf("ready\n");
        fflush(stdout);
        for (;;)
            pause();
    }
    printf("ready\n");
    fflush(stdout);
    if (!reading)
        pause_loop(NULL);
    for (;;) {
        char buf[256];
        ssize_t got = read(0, buf, sizeof buf - 1);
        if (got < 0)
            printf("read-error=%d usr1=%d\n", errno, (int)usr1_count);
        else {
            buf[got] = 0;
            buf[strcspn(buf, "\r\n")] = 0;
            printf("read=%s usr1=%d\n", buf, (int)usr1_count);
        }
        fflush(stdout);
        if (got == 0)
            return 0;
    }
}
