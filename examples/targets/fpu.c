/*
 * fpu: CPU-bound vector floating-point loop (build with -O2 -march=native, -lm).
 *
 * Sixteen 512-bit accumulators (GCC vector extension: zmm registers on AVX-512, pairs of
 * ymm on AVX2) stay live in registers for the whole round, and the rounding mode is
 * switched to round-toward-zero (MXCSR), so a restore that loses or truncates the
 * extended register state, or resets MXCSR, changes the numbers. Each round prints
 *
 *   r=<round> s=<sum, %.17g> h=<running FNV-1a hash of every sum so far>
 *
 * and the output depends only on the round number: a fresh instance run with
 * -n ROUNDS must print bit-identical lines.
 *
 * usage: fpu [-n ROUNDS] [-w WORK]   (WORK: inner repetitions per round, default 250000, ~50 ms)
 */
#define _GNU_SOURCE
#include <fenv.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef double v8d __attribute__((vector_size(64)));

#define N 2048
#define NACC 16

static double a[N], b[N];

static inline v8d load(const double *p)
{
    v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v8d seed(long round, int k)
{
    v8d v;
    for (int l = 0; l < 8; l++)
        v[l] = (double)(round + k * 8 + l) * 1e-3;
    return v;
}

static inline double fold(v8d v, int k)
{
    double s = 0;
    for (int l = 0; l < 8; l++)
        s += v[l] / (k + l + 1);
    return s;
}

int main(int argc, char **argv)
{
    long rounds = 0, work = 250000;
    int opt;
    while ((opt = getopt(argc, argv, "n:w:")) != -1) {
        switch (opt) {
        case 'n': rounds = atol(optarg); break;
        case 'w': work = atol(optarg); break;
        default:
            fprintf(stderr, "usage: %s [-n ROUNDS] [-w WORK]\n", argv[0]);
            return 2;
        }
    }
    if (fesetround(FE_TOWARDZERO) != 0) {
        fprintf(stderr, "fesetround failed\n");
        return 2;
    }
    for (int i = 0; i < N; i++) {
        a[i] = (i + 1) * 0.001;
        b[i] = 1.0 / (i + 3);
    }
    uint64_t hash = 1469598103934665603ull;
    for (long round = 1; !rounds || round <= rounds; round++) {
        /* Sixteen named accumulators so the compiler keeps them all in registers. */
#define ACCS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) \
                X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define DECL(k) v8d acc##k = seed(round, k);
#define STEP(k) acc##k = acc##k * decay + load(&a[i + 8 * k]) * load(&b[i + 8 * k]) + bump;
#define FOLD(k) s += fold(acc##k, k);
        ACCS(DECL)
        const v8d decay = {0.999999, 0.999999, 0.999999, 0.999999,
                           0.999999, 0.999999, 0.999999, 0.999999};
        const v8d lane = {0, 1e-12, 2e-12, 3e-12, 4e-12, 5e-12, 6e-12, 7e-12};
        for (long rep = 0; rep < work; rep++) {
            v8d bump = lane + (double)rep * 1e-9;
            for (int i = 0; i < N; i += 8 * NACC) {
                ACCS(STEP)
            }
        }
        double s = 0;
        ACCS(FOLD)
        uint64_t bits;
        memcpy(&bits, &s, sizeof bits);
        for (int byte = 0; byte < 8; byte++)
            hash = (hash ^ ((bits >> (8 * byte)) & 0xff)) * 1099511628211ull;
        printf("r=%ld s=%.17g h=%016llx\n", round, s, (unsigned long long)hash);
        fflush(stdout);
    }
    return 0;
}
