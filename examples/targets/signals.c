/*
 * signals: signal dispositions and the signal mask must survive a checkpoint.
 *
 * SIGUSR1 and SIGUSR2 have handlers (counting), SIGHUP is blocked with sigprocmask.
 * Every PERIOD ms (default 50) it prints, from fresh queries of the kernel state:
 *
 *   tick=<n> usr1=<count> usr2=<count> blocked_hup=<0|1> pending_hup=<0|1>
 *     usr1_flags=<sa_flags of SIGUSR1> usr2_mask_term=<0|1>
 *
 * blocked_hup comes from sigprocmask(), pending_hup from sigpending(); the SIGUSR1
 * handler is installed with SA_RESTART|SA_NODEFER (usr1_flags shows them back) and the
 * SIGUSR2 handler with SIGTERM in its sa_mask (usr2_mask_term), so a restore that
 * rebuilds dispositions wrongly changes the line. A lost mask lets SIGHUP kill it.
 *
 * usage: signals [PERIOD_MS]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static volatile sig_atomic_t usr1_count, usr2_count;

static void on_usr1(int sig)
{
    (void)sig;
    usr1_count++;
}

static void on_usr2(int sig)
{
    (void)sig;
    usr2_count++;
}

static void install(int sig, void (*fn)(int), int flags, int masked)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    if (masked)
        sigaddset(&sa.sa_mask, masked);
    if (sigaction(sig, &sa, NULL) != 0) {
        perror("sigaction");
        exit(1);
    }
}

int main(int argc, char **argv)
{
    long period = argc > 1 ? atol(argv[1]) : 50;
    install(SIGUSR1, on_usr1, SA_RESTART | SA_NODEFER, 0);
    install(SIGUSR2, on_usr2, 0, SIGTERM);
    sigset_t hup;
    sigemptyset(&hup);
    sigaddset(&hup, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &hup, NULL) != 0) {
        perror("sigprocmask");
        return 1;
    }
    for (long tick = 1;; tick++) {
        sigset_t cur, pending;
        struct sigaction sa1, sa2;
        sigprocmask(SIG_BLOCK, NULL, &cur);
        sigpending(&pending);
        sigaction(SIGUSR1, NULL, &sa1);
        sigaction(SIGUSR2, NULL, &sa2);
        printf("tick=%ld usr1=%d usr2=%d blocked_hup=%d pending_hup=%d"
               " usr1_flags=%#x usr2_mask_term=%d\n",
               tick, (int)usr1_count, (int)usr2_count, sigismember(&cur, SIGHUP),
               sigismember(&pending, SIGHUP),
               (unsigned)sa1.sa_flags & (SA_RESTART | SA_NODEFER | SA_SIGINFO),
               sigismember(&sa2.sa_mask, SIGTERM));
        fflush(stdout);
        struct timespec ts = {period / 1000, (period % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
            ;
    }
}
