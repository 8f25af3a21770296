/*
 * counter: a deterministic, slowly counting target for checkpoint/restore tests.
 *
 * Every iteration increments three counters that live in different kinds of memory
 *   n  a global in .data/.bss            (+1)
 *   m  a word in an anonymous mmap area  (+2; private, or shared with -s)
 *   h  a word in a malloc'd heap block   (+3)
 * and a double accumulator f (+0.5) that lives on the stack / in an FP register, then
 * writes one fixed-width line and sleeps PERIOD ms:
 *
 *   n=00000001 m=00000002 h=00000003 f=00000000.5 pid=0012345
 *
 * Line n always lands at file offset (n-1)*LINE_LEN, whoever writes it, so two writers
 * sharing a file (an original left running and its restored copy) leave a readable
 * file, and a restore that gets the offset wrong shows up as a gap, a repeat or NULs.
 *
 * usage: counter [-o FILE] [-n LIMIT] [-x STATUS] [-p PERIOD_MS] [-s]
 *   -o FILE    write to FILE (opened once, truncated, not O_APPEND) instead of stdout
 *   -n LIMIT   exit after the line with n == LIMIT ...
 *   -x STATUS  ... with this exit status (default 0)
 *   -p MS      sleep between lines (default 50)
 *   -s         keep m in a MAP_SHARED|MAP_ANONYMOUS area instead of a private one
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

long n_global;

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

int main(int argc, char **argv)
{
    const char *path = NULL;
    long limit = 0, period = 50;
    int status = 0, share = MAP_PRIVATE, opt;
    while ((opt = getopt(argc, argv, "o:n:x:p:s")) != -1) {
        switch (opt) {
        case 'o': path = optarg; break;
        case 'n': limit = atol(optarg); break;
        case 'x': status = atoi(optarg); break;
        case 'p': period = atol(optarg); break;
        case 's': share = MAP_SHARED; break;
        default:
            fprintf(stderr, "usage: %s [-o FILE] [-n LIMIT] [-x STATUS] [-p MS] [-s]\n",
                    argv[0]);
            return 2;
        }
    }
    FILE *out = stdout;
    if (path && !(out = fopen(path, "w"))) {
        perror(path);
        return 2;
    }
    long *m = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, share | MAP_ANONYMOUS, -1, 0);
    long *h = malloc(64 * 1024);
    if (m == MAP_FAILED || !h) {
        perror("alloc");
        return 2;
    }
    m[1000] = 0;
    h[100] = 0;
    double f = 0.0;
    for (;;) {
        n_global++;
        m[1000] += 2;
        h[100] += 3;
        f += 0.5;
        fprintf(out, "n=%08ld m=%08ld h=%08ld f=%010.1f pid=%07d\n",
                n_global, m[1000], h[100], f, (int)getpid());
        fflush(out);
        if (limit && n_global >= limit)
            return status;
        sleep_ms(period);
    }
}
