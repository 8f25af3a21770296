/*
 * sleeper: a target that spends almost all its time blocked in a system call, so a
 * dump catches it inside one and the restore has to resume it.
 *
 * usage: sleeper sleep [SECONDS]   (default 3)
 *   Line n, then nanosleep(SECONDS) and line n+1. An interrupted sleep is resumed with
 *   the remaining time the kernel reported, and the sleep's own CLOCK_MONOTONIC length
 *   is printed, so a restore that ends the sleep early (slept_ms < SECONDS*1000), loses
 *   the "remaining" time or never wakes up is visible:
 *     n=<n> slept_ms=<ms the previous sleep took> eintr=<interrupted sleeps so far>
 *
 * usage: sleeper wait [SECONDS]    (default 3)
 *   SIGUSR1 is blocked and collected with sigtimedwait(SECONDS): each line says whether
 *   the wait ended by the signal or by the timeout. An interrupted wait (EINTR) is
 *   retried until its deadline. If the restored process lost its signal mask, SIGUSR1
 *   kills it; if it is not back in the wait, the signal never shows up as a line:
 *     n=<n> got=<usr1|timeout> usr1=<signals received so far> eintr=<retries so far>
 *   Line n=0 (got=start) is printed once SIGUSR1 is blocked: it is safe to send it then.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static int run_sleep(long seconds)
{
    long eintr = 0, slept = 0;
    for (long n = 1;; n++) {
        printf("n=%ld slept_ms=%ld eintr=%ld\n", n, slept, eintr);
        fflush(stdout);
        long start = now_ms();
        struct timespec ts = {seconds, 0};
        while (nanosleep(&ts, &ts) == -1) {
            if (errno != EINTR) {
                perror("nanosleep");
                return 1;
            }
            eintr++;
        }
        slept = now_ms() - start;
    }
}

static int run_wait(long seconds)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0) {
        perror("sigprocmask");
        return 1;
    }
    long eintr = 0, usr1 = 0;
    printf("n=0 got=start usr1=0 eintr=0\n"); /* SIGUSR1 is blocked from here on */
    fflush(stdout);
    for (long n = 1;; n++) {
        long deadline = now_ms() + seconds * 1000L;
        const char *got = "timeout";
        for (;;) {
            long left = deadline - now_ms();
            if (left < 0)
                left = 0;
            struct timespec ts = {left / 1000, (left % 1000) * 1000000L};
            int sig = sigtimedwait(&set, NULL, &ts);
            if (sig == SIGUSR1) {
                usr1++;
                got = "usr1";
                break;
            }
            if (sig == -1 && errno == EAGAIN)
                break;
            if (sig == -1 && errno == EINTR) {
                eintr++;
                continue;
            }
            fprintf(stderr, "sigtimedwait: unexpected %d (%s)\n", sig, strerror(errno));
            return 1;
        }
        printf("n=%ld got=%s usr1=%ld eintr=%ld\n", n, got, usr1, eintr);
        fflush(stdout);
    }
}

int main(int argc, char **argv)
{
    long seconds = argc > 2 ? atol(argv[2]) : 3;
    if (argc > 1 && strcmp(argv[1], "sleep") == 0)
        return run_sleep(seconds);
    if (argc > 1 && strcmp(argv[1], "wait") == 0)
        return run_wait(seconds);
    fprintf(stderr, "usage: %s sleep|wait [SECONDS]\n", argv[0]);
    return 2;
}
