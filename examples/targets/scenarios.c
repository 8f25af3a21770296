/*
 * scenarios: a target whose memory changes in well-defined ways between checkpoint
 * passes, and which can check every byte of it afterwards.
 *
 * usage: scenarios DIR        the scenario target; DIR holds its two data files
 *        scenarios --pages K  a 64 MiB region and nothing else (see pages_main below)
 *
 * Protocol (both modes): after setup it prints `ready phase=0`; each SIGUSR1 advances to
 * the next phase (the handler only counts; the main loop performs the phase's mutations,
 * then prints `phase=<k> done`); each SIGUSR2 checks ALL its regions and prints
 * `verify ok phase=<k> pages=<n>` or `verify FAIL <region> <page> want=.. got=..; ...`
 * (the first few mismatches, then the total). Between signals the main thread is blocked
 * in sigsuspend. Informational lines (`layout ...`, `info ...`) come before `ready` and
 * before each `phase=<k> done`.
 *
 * Page contents. Every checked 4 KiB unit holds fill(region, page, stamp): 512 words
 * derived from those three numbers, never all zero. `stamp` is the phase in which the
 * page was last written (or a thread iteration, a file block, FILE for untouched pages
 * of the file mapping), or ZERO: the page must read as zeros (never written, or dropped
 * by munmap/MADV_DONTNEED/brk shrink). Stamps are kept in small bookkeeping arrays in
 * the process itself; a restore that gets the bookkeeping wrong fails too, which is fine.
 * On a mismatch the checker says which stamp the page actually holds (s<k>, zero, ?), so
 * "stale data from an older pass" is visible as such.
 *
 * Regions (all anonymous ones are carved with MAP_FIXED out of one PROT_NONE reservation,
 * one PROT_NONE guard page between them, so neighbours never merge and addresses are
 * known; the `layout` line prints them):
 *  a  4 MiB: every page but each 8th written at setup; each phase writes 37 pages chosen
 *     by a PRNG seeded with the phase.
 *  b  16 pages: each phase munmaps the region and mmaps it again at the same address
 *     (the seed scenario: /proc/PID/maps is byte-identical), writing 2 of every 3 pages;
 *     the others must read zero, not the old content.
 *  c  32 pages: each phase maps a fresh anonymous mapping with MAP_FIXED over 8 pages in
 *     the middle (every other one written, the rest zero) and writes page 0.
 *  d  8 pages + room: each phase mremap-grows it in place by 2 pages (the room after it
 *     is reserved PROT_NONE and unmapped just before), writes the first new page (the
 *     second must read zero) and one old page.
 *  e  8 pages: each phase mremap-moves it (MREMAP_FIXED) to the other of two slots and
 *     writes one page; its address is bookkeeping; the old slot must be PROT_NONE again.
 *  f  16 pages: odd phases write pages in the middle, then mprotect the middle 8 pages
 *     read-only; even phases make them writable again and write some. The checker also
 *     wants the right protection in /proc/self/maps.
 *  g  32 pages: each phase writes 2 pages then MADV_DONTNEEDs 4: they must read zero
 *     (restoring the parent's copy is the classic stale-data bug).
 *  h  the brk heap (16 pages above the page-aligned break after setup): odd phases grow
 *     it by 3 written pages; even phases shrink it by 2 and grow it by 1 page that must
 *     read zero. The kernel's break (brk(0)) must equal the bookkeeping's end. Nothing
 *     calls malloc after setup, so only this code moves the break.
 *  i  each phase k >= 1 mmaps a new region (address chosen by the kernel, kept in
 *     bookkeeping) of 4 + k%5 pages, all but the last written, and rewrites page 0 of
 *     the region of phase k-1.
 *  j  the main thread's stack: the main loop is recursive; each level has a 64 KiB local
 *     array, filled when the level is entered (setup, then once per phase) and never
 *     returned from, so the [stack] VMA grows by 64 KiB each phase and every level's
 *     array is live memory (above the stack pointer, unlike dead frames below it that
 *     signal delivery may overwrite). Each phase also rewrites one 4 KiB chunk of level
 *     0's array. Chunks are 4 KiB units of the arrays, not necessarily page aligned.
 *  k  16 pages MAP_PRIVATE of DIR/scen-map.dat (created at startup with known content,
 *     closed after mmap): untouched pages must come from the file, pages written in
 *     phase k (COW copies) must come back.
 *  l  4 MiB, 2 MiB aligned, MADV_HUGEPAGE: the first 2 MiB written at setup; each phase
 *     writes one 4 KiB page in each half (a small write into a huge page; the first
 *     write into the second half makes the kernel allocate it, zero filled).
 *  m  8 pages: each phase pread()s a block of DIR/scen-read.dat (held open O_RDONLY
 *     for the process's life) into one page: the kernel, not user code, writes it.
 *  n  2 threads, 1 MiB each: thread t writes its pages 0..255 in order, each stamped with
 *     (t, iteration), publishing after each page `pos` (pages done in this iteration),
 *     then sleeps 1 ms and starts the next iteration. They run through every predump.
 *     For a check, the main thread bumps a stop generation; each thread parks at a page
 *     boundary and acknowledges it. Then exactly: pages < pos hold iteration `cur`,
 *     pages >= pos hold `cur-1` (zero if cur-1 == 0). After the check they go on.
 *
 * Only regular files and /dev/null as fds (stdio is set up by the caller).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define P 4096UL
#define MAXPHASE 60
#define ZERO 0xFFFFFFFFu
#define FILESTAMP 0xF11Eu
#define MBLOCK 0x10000u /* region m: stamp MBLOCK+b means "block b of scen-read.dat" */

#define A_PAGES 1024
#define B_PAGES 16
#define C_PAGES 32
#define D_PAGES 8
#define D_ROOM (D_PAGES + 2 * MAXPHASE + 8)
#define E_PAGES 8
#define F_PAGES 16
#define G_PAGES 32
#define H_PAGES 16
#define H_MAX (H_PAGES + 2 * MAXPHASE + 8)
#define I_MAX 9
#define J_CHUNKS 16 /* 64 KiB per stack level */
#define K_PAGES 16
#define L_PAGES 1024 /* 4 MiB */
#define M_PAGES 8
#define M_BLOCKS 16
#define T_PAGES 256

enum {
    R_A = 1, R_B, R_C, R_D, R_E, R_F, R_G, R_H, R_I, R_J, R_K, R_L, R_M, R_MFILE, R_T0,
    R_T1, R_PAGES
};

#define NOINLINE __attribute__((noinline))

/* ------------------------------------------------------------------ common */

static char outbuf[8192];
static volatile sig_atomic_t usr1_count, usr2_count;
static int phase;
static sigset_t wait_mask; /* the mask sigsuspend waits with: USR1/USR2 unblocked */

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("fatal: ");
    vprintf(fmt, ap);
    printf(" (errno %d %s)\n", errno, strerror(errno));
    va_end(ap);
    fflush(stdout);
    _exit(2);
}

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static inline uint64_t page_base(unsigned region, uint64_t page, uint64_t stamp)
{
    return mix64(((uint64_t)region << 56) ^ (page << 32) ^ stamp ^ 0x5ca1ab1e00000000ULL);
}

/* fill(region, page, stamp): 512 words, base + i*odd, never all zero */
static inline void fill(void *dst, unsigned region, uint64_t page, uint64_t stamp)
{
    uint64_t *w = dst, base = page_base(region, page, stamp);
    for (unsigned i = 0; i < P / 8; i++)
        w[i] = base + i * 0x9E3779B97F4A7C15ULL;
}

/* the same, with volatile stores (the kernel, another thread or a later read must see
 * every word; the compiler may not drop or merge them) */
static inline void fill_v(volatile uint64_t *w, unsigned region, uint64_t page,
                          uint64_t stamp)
{
    uint64_t base = page_base(region, page, stamp);
    for (unsigned i = 0; i < P / 8; i++)
        w[i] = base + i * 0x9E3779B97F4A7C15ULL;
}

static int is_fill(const void *src, unsigned region, uint64_t page, uint64_t stamp)
{
    const uint64_t *w = src;
    uint64_t base = page_base(region, page, stamp);
    for (unsigned i = 0; i < P / 8; i++)
        if (w[i] != base + i * 0x9E3779B97F4A7C15ULL)
            return 0;
    return 1;
}

static int is_zero(const void *src)
{
    const uint64_t *w = src;
    for (unsigned i = 0; i < P / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

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

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static void setup_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGUSR2);
    /* blocked everywhere except inside sigsuspend; threads inherit the block */
    sigprocmask(SIG_BLOCK, &block, &wait_mask);
    sigdelset(&wait_mask, SIGUSR1);
    sigdelset(&wait_mask, SIGUSR2);
}

/* block in sigsuspend until a signal is pending; 1 = advance a phase, 2 = verify */
static int next_event(int *seen1, int *seen2)
{
    for (;;) {
        if (usr2_count != *seen2) {
            (*seen2)++;
            return 2;
        }
        if (usr1_count != *seen1) {
            (*seen1)++;
            return 1;
        }
        sigsuspend(&wait_mask);
    }
}

/* ------------------------------------------------------------------ checking */

static sigjmp_buf fault_jb;
static volatile sig_atomic_t in_check;
static char failbuf[1024];
static size_t faillen;
static unsigned long nfail, nchecked;

static void on_fault(int sig)
{
    if (in_check)
        siglongjmp(fault_jb, 1);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void add_fail(const char *fmt, ...)
{
    nfail++;
    if (nfail > 6 || faillen >= sizeof failbuf - 200)
        return;
    va_list ap;
    va_start(ap, fmt);
    faillen += vsnprintf(failbuf + faillen, sizeof failbuf - faillen, fmt, ap);
    va_end(ap);
    faillen += snprintf(failbuf + faillen, sizeof failbuf - faillen, "; ");
}

static void stamp_name(char *buf, size_t n, uint32_t stamp)
{
    if (stamp == ZERO)
        snprintf(buf, n, "zero");
    else if (stamp == FILESTAMP)
        snprintf(buf, n, "file");
    else if (stamp >= MBLOCK)
        snprintf(buf, n, "block%u", stamp - MBLOCK);
    else
        snprintf(buf, n, "s%u", stamp);
}

static int expected_is(const void *src, unsigned region, unsigned long page, uint32_t stamp)
{
    if (stamp == ZERO)
        return is_zero(src);
    if (region == R_M && stamp >= MBLOCK && stamp != FILESTAMP)
        return is_fill(src, R_MFILE, stamp - MBLOCK, 0);
    return is_fill(src, region, page, stamp);
}

/* what does this page hold? (for the failure message) */
static void identify(char *buf, size_t n, const void *src, unsigned region,
                     unsigned long page, uint32_t want)
{
    if (is_zero(src)) {
        snprintf(buf, n, "zero");
        return;
    }
    if (is_fill(src, region, page, FILESTAMP)) {
        snprintf(buf, n, "file");
        return;
    }
    uint32_t lo = 0, hi = (uint32_t)phase + 2;
    if (region == R_T0 || region == R_T1) { /* thread iterations */
        uint32_t w = want == ZERO ? 0 : want;
        lo = w > 50 ? w - 50 : 0;
        hi = w + 50;
    }
    for (uint32_t s = lo; s <= hi; s++)
        if (is_fill(src, region, page, s)) {
            snprintf(buf, n, "s%u", s);
            return;
        }
    if (region == R_M)
        for (uint32_t b = 0; b < M_BLOCKS; b++)
            if (is_fill(src, R_MFILE, b, 0)) {
                snprintf(buf, n, "block%u", b);
                return;
            }
    const uint64_t *w = src;
    unsigned bad = 0;
    uint64_t base = page_base(region, page, want);
    for (unsigned i = 0; i < P / 8; i++)
        bad += want != ZERO && w[i] != base + i * 0x9E3779B97F4A7C15ULL;
    snprintf(buf, n, "?(%u words differ from want)", bad);
}

static void check_unit(const char *name, unsigned region, unsigned long page,
                       const volatile void *addr, uint32_t stamp)
{
    const void *src = (const void *)addr;
    char want[24], got[48];
    nchecked++;
    in_check = 1;
    if (sigsetjmp(fault_jb, 0)) {
        in_check = 0;
        stamp_name(want, sizeof want, stamp);
        add_fail("%s %lu want=%s got=fault@%p", name, page, want, src);
        return;
    }
    int ok = expected_is(src, region, page, stamp);
    if (!ok) {
        stamp_name(want, sizeof want, stamp);
        identify(got, sizeof got, src, region, page, stamp);
    }
    in_check = 0;
    if (!ok)
        add_fail("%s %lu want=%s got=%s", name, page, want, got);
}

static char mapsbuf[1 << 17];

static void read_maps(void)
{
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    size_t len = 0;
    ssize_t r;
    if (fd < 0)
        die("open /proc/self/maps");
    while ((r = read(fd, mapsbuf + len, sizeof mapsbuf - 1 - len)) > 0)
        len += (size_t)r;
    close(fd);
    mapsbuf[len] = 0;
}

/* the maps line containing addr: start, end, perms; 0 if none */
static int maps_find(uintptr_t addr, uintptr_t *start, uintptr_t *end, char perms[5],
                     char *path, size_t pathlen)
{
    char *line = mapsbuf;
    while (*line) {
        char *nl = strchr(line, '\n');
        unsigned long s, e;
        char pr[5] = {0};
        int off = 0;
        if (sscanf(line, "%lx-%lx %4s %*s %*s %*s %n", &s, &e, pr, &off) >= 3 && s <= addr &&
            addr < e) {
            *start = s;
            *end = e;
            memcpy(perms, pr, 5);
            if (path) {
                size_t n = nl ? (size_t)(nl - line) : strlen(line);
                n = (size_t)off < n ? n - (size_t)off : 0;
                if (n >= pathlen)
                    n = pathlen - 1;
                memcpy(path, line + off, n);
                path[n] = 0;
            }
            return 1;
        }
        if (!nl)
            break;
        line = nl + 1;
    }
    return 0;
}

/* want the VMA containing addr to have these perms (and, if exact, exactly [lo, hi)) */
static void check_vma(const char *name, uintptr_t addr, const char *perms, uintptr_t lo,
                      uintptr_t hi)
{
    uintptr_t s, e;
    char pr[5];
    if (!maps_find(addr, &s, &e, pr, NULL, 0)) {
        add_fail("%s-vma 0 want=%s got=unmapped@%lx", name, perms, (unsigned long)addr);
        return;
    }
    if (strcmp(pr, perms) != 0)
        add_fail("%s-vma 0 want=%s got=%s@%lx", name, perms, pr, (unsigned long)addr);
    if (hi && (s != lo || e != hi))
        add_fail("%s-vma 0 want=%lx-%lx got=%lx-%lx", name, (unsigned long)lo,
                 (unsigned long)hi, (unsigned long)s, (unsigned long)e);
}

static void report(void)
{
    if (nfail == 0)
        say("verify ok phase=%d pages=%lu\n", phase, nchecked);
    else
        say("verify FAIL %s(total %lu of %lu)\n", failbuf, nfail, nchecked);
    nfail = nchecked = 0;
    faillen = 0;
    failbuf[0] = 0;
}

/* ------------------------------------------------------------------ pages mode
 *
 * `scenarios --pages K`: one 64 MiB anonymous region (MADV_NOHUGEPAGE, so one write
 * dirties one 4 KiB page), every page written at setup. Phase k writes exactly K pages
 * p_j = (k*7919 + j*613) mod 16384, j < K (distinct: 613 is odd) and nothing else but
 * the few bytes any signal + printf touches (signal frame and printf's frames on the
 * stack, the counters here, stdout's FILE and buffer, errno). The stack is pre-grown
 * and every function of that path is called once before `ready`, so no stack VMA
 * growth and no lazy PLT binding happen later. No bookkeeping array: the check
 * recomputes which phase last wrote each page (inverting the formula above).
 */
#define PG_PAGES 16384UL
#define PG_STEP 613UL

static unsigned long pg_k;
static unsigned char *pg;

static unsigned long inv_mod(unsigned long a, unsigned long m)
{
    for (unsigned long x = 1; x < m; x++)
        if (a * x % m == 1)
            return x;
    return 0;
}

static void pages_phase(int k)
{
    for (unsigned long j = 0; j < pg_k; j++) {
        unsigned long p = ((unsigned long)k * 7919UL + j * PG_STEP) % PG_PAGES;
        fill(pg + p * P, R_PAGES, p, (uint64_t)k);
    }
}

static void pages_verify(void)
{
    unsigned long inv = inv_mod(PG_STEP, PG_PAGES);
    for (unsigned long p = 0; p < PG_PAGES; p++) {
        uint32_t stamp = 0;
        for (int k = phase; k >= 1; k--) {
            unsigned long j = ((p + PG_PAGES * 8 - ((unsigned long)k * 7919UL) % PG_PAGES) %
                               PG_PAGES) * inv % PG_PAGES;
            if (j < pg_k) {
                stamp = (uint32_t)k;
                break;
            }
        }
        check_unit("pages", R_PAGES, p, pg + p * P, stamp);
    }
    report();
}

static NOINLINE void pregrow_stack(void)
{
    volatile unsigned char buf[96 * 1024];
    for (size_t i = 0; i < sizeof buf; i += 512)
        buf[i] = (unsigned char)i;
}

__attribute__((noreturn)) static void pages_main(unsigned long k)
{
    if (k == 0 || k >= PG_PAGES)
        die("--pages K: K must be in 1..%lu", PG_PAGES - 1);
    pg_k = k;
    pg = mmap(NULL, PG_PAGES * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pg == MAP_FAILED)
        die("mmap 64 MiB");
    madvise(pg, PG_PAGES * P, MADV_NOHUGEPAGE);
    for (unsigned long p = 0; p < PG_PAGES; p++)
        fill(pg + p * P, R_PAGES, p, 0);
    pregrow_stack();
    /* warm the path a phase takes: signal delivery into sigsuspend (a raise() of our
     * own, consumed here), a page fill (same content again), printf + fflush */
    int seen1 = 0, seen2 = 0;
    raise(SIGUSR2);
    next_event(&seen1, &seen2);
    fill(pg, R_PAGES, 0, 0);
    say("layout pages=%p npages=%lu k=%lu\n", (void *)pg, PG_PAGES, pg_k);
    say("ready phase=0\n");
    for (;;) {
        if (next_event(&seen1, &seen2) == 2) {
            pages_verify();
            continue;
        }
        if (phase >= MAXPHASE) {
            say("phase limit\n");
            continue;
        }
        phase++;
        pages_phase(phase);
        say("phase=%d done\n", phase);
    }
}

/* ------------------------------------------------------------------ scenario regions */

static unsigned char *resv, *resv_cur, *resv_end;

static unsigned char *carve(unsigned long npages, unsigned long align)
{
    uintptr_t at = (uintptr_t)resv_cur + P; /* guard page */
    at = (at + align - 1) & ~(align - 1);
    if (at + npages * P > (uintptr_t)resv_end)
        die("reservation too small");
    resv_cur = (unsigned char *)(at + npages * P);
    return (unsigned char *)at;
}

static void *map_anon_fixed(void *addr, unsigned long len, int prot, int extra)
{
    void *r = mmap(addr, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | extra, -1, 0);
    if (r == MAP_FAILED || r != addr)
        die("mmap %p len %lu flags %#x -> %p", addr, len, extra, r);
    return r;
}

static unsigned char *ra, *rb, *rc, *rd, *re_slot[2], *re, *rf, *rg, *rk, *rl, *rm,
    *rt[2];
static unsigned char *h_base;
static unsigned long d_pages, h_pages, c_mid;
static uint32_t st_a[A_PAGES], st_b[B_PAGES], st_c[C_PAGES], st_d[D_ROOM], st_e[E_PAGES],
    st_f[F_PAGES], st_g[G_PAGES], st_h[H_MAX], st_k[K_PAGES], st_l[L_PAGES], st_m[M_PAGES];
static unsigned char *i_addr[MAXPHASE + 1];
static unsigned long i_pages[MAXPHASE + 1];
static uint32_t st_i[MAXPHASE + 1][I_MAX];
static volatile uint64_t *j_frame[MAXPHASE + 1];
static int j_levels;
static uint32_t st_j[MAXPHASE + 1][J_CHUNKS];
static int read_fd = -1;
static char map_path[4096];

/* ---- threads (n) */
struct worker {
    int t;
    volatile uint64_t *mem;
    uint32_t cur;                  /* iteration in progress (1-based) */
    uint32_t pos;                  /* pages of `cur` completed */
    unsigned stop_ack;             /* last stop generation acknowledged */
};
static struct worker workers[2];
static unsigned stop_gen;          /* odd: stop requested */
static pthread_t threads[2];

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    for (;;) {
        uint32_t cur = __atomic_load_n(&w->cur, __ATOMIC_RELAXED) + 1;
        __atomic_store_n(&w->pos, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&w->cur, cur, __ATOMIC_RELEASE);
        for (uint32_t p = 0; p < T_PAGES; p++) {
            unsigned g;
            while ((g = __atomic_load_n(&stop_gen, __ATOMIC_ACQUIRE)) & 1) {
                __atomic_store_n(&w->stop_ack, g, __ATOMIC_RELEASE);
                sleep_us(200);
            }
            fill_v(w->mem + p * (P / 8), R_T0 + w->t, p, cur);
            __atomic_store_n(&w->pos, p + 1, __ATOMIC_RELEASE);
        }
        sleep_us(1000);
    }
    return NULL;
}

static void check_threads(void)
{
    unsigned g = __atomic_add_fetch(&stop_gen, 1, __ATOMIC_ACQ_REL); /* now odd */
    for (int t = 0; t < 2; t++) {
        int waited = 0;
        while (__atomic_load_n(&workers[t].stop_ack, __ATOMIC_ACQUIRE) != g) {
            if (waited++ > 5000) { /* 5 s */
                add_fail("n%d 0 want=parked got=still-running", t);
                break;
            }
            sleep_us(1000);
        }
    }
    for (int t = 0; t < 2; t++) {
        struct worker *w = &workers[t];
        uint32_t cur = __atomic_load_n(&w->cur, __ATOMIC_ACQUIRE);
        uint32_t pos = __atomic_load_n(&w->pos, __ATOMIC_ACQUIRE);
        char name[4] = {'n', (char)('0' + t), 0, 0};
        for (uint32_t p = 0; p < T_PAGES; p++) {
            uint32_t want = p < pos ? cur : cur - 1;
            check_unit(name, R_T0 + t, p, w->mem + p * (P / 8), want == 0 ? ZERO : want);
        }
    }
    __atomic_add_fetch(&stop_gen, 1, __ATOMIC_ACQ_REL); /* even again: go on */
}

/* ---- phase 0: setup */

static void write_file(const char *path, unsigned region, unsigned npages, uint32_t stamp)
{
    static uint64_t buf[P / 8];
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        die("create %s", path);
    for (unsigned p = 0; p < npages; p++) {
        fill(buf, region, p, stamp);
        if (write(fd, buf, P) != (ssize_t)P)
            die("write %s", path);
    }
    if (fsync(fd) != 0 || close(fd) != 0)
        die("close %s", path);
}

static void setup(const char *dir)
{
    /* malloc'd things first (stdio, pthread), then the break is ours alone */
    free(malloc(64));
    for (int t = 0; t < 2; t++) {
        workers[t].t = t;
    }

    resv = mmap(NULL, 32UL << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                -1, 0);
    if (resv == MAP_FAILED)
        die("reserve");
    resv_cur = resv;
    resv_end = resv + (32UL << 20);

    /* a */
    ra = map_anon_fixed(carve(A_PAGES, P), A_PAGES * P, PROT_READ | PROT_WRITE, MAP_FIXED);
    for (unsigned p = 0; p < A_PAGES; p++) {
        st_a[p] = p % 8 == 7 ? ZERO : 0;
        if (st_a[p] == 0)
            fill(ra + p * P, R_A, p, 0);
    }
    /* b */
    rb = map_anon_fixed(carve(B_PAGES, P), B_PAGES * P, PROT_READ | PROT_WRITE, MAP_FIXED);
    for (unsigned p = 0; p < B_PAGES; p++)
        fill(rb + p * P, R_B, p, st_b[p] = 0);
    /* c */
    rc = map_anon_fixed(carve(C_PAGES, P), C_PAGES * P, PROT_READ | PROT_WRITE, MAP_FIXED);
    for (unsigned p = 0; p < C_PAGES; p++)
        fill(rc + p * P, R_C, p, st_c[p] = 0);
    /* d: the room after it stays PROT_NONE (part of the reservation) */
    rd = carve(D_ROOM, P);
    map_anon_fixed(rd, D_PAGES * P, PROT_READ | PROT_WRITE, MAP_FIXED);
    d_pages = D_PAGES;
    for (unsigned p = 0; p < D_PAGES; p++)
        fill(rd + p * P, R_D, p, st_d[p] = 0);
    /* e: two slots, starts in slot 0 */
    re_slot[0] = carve(E_PAGES, P);
    re_slot[1] = carve(E_PAGES, P);
    re = map_anon_fixed(re_slot[0], E_PAGES * P, PROT_READ | PROT_WRITE, MAP_FIXED);
    for (unsigned p = 0; p < E_PAGES; p++)
        fill(re + p * P, R_E, p, st_e[p] = 0);
    /* f */
    rf = map_anon_fixed(carve(F_PAGES, P), F_PAGES * P, PROT_READ | PROT_WRITE, MAP_FIXED);
    for (unsigned p = 0; p < F_PAGES; p++)
        fill(rf + p * P, R_F, p, st_f[p] = 0);
    /* g */
    rg = map_anon_fixed(carve(G_PAGES, P), G_PAGES * P, PROT_READ | PROT_WRITE, MAP_FIXED);
    for (unsigned p = 0; p < G_PAGES; p++)
        fill(rg + p * P, R_G, p, st_g[p] = 0);
    /* k: private file mapping */
    snprintf(map_path, sizeof map_path, "%s/scen-map.dat", dir);
    write_file(map_path, R_K, K_PAGES, FILESTAMP);
    rk = carve(K_PAGES, P);
    {
        int fd = open(map_path, O_RDWR | O_CLOEXEC);
        if (fd < 0)
            die("open %s", map_path);
        if (mmap(rk, K_PAGES * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0) !=
            rk)
            die("mmap %s", map_path);
        close(fd);
    }
    for (unsigned p = 0; p < K_PAGES; p++) {
        st_k[p] = FILESTAMP;
        (void)*(volatile unsigned char *)(rk + p * P); /* read fault: page cache page */
    }
    /* l: THP */
    rl = map_anon_fixed(carve(L_PAGES, 2UL << 20), L_PAGES * P, PROT_READ | PROT_WRITE,
                        MAP_FIXED);
    if (madvise(rl, L_PAGES * P, MADV_HUGEPAGE) != 0)
        die("madvise HUGEPAGE");
    for (unsigned p = 0; p < L_PAGES; p++) {
        st_l[p] = p < L_PAGES / 2 ? 0 : ZERO;
        if (st_l[p] == 0)
            fill(rl + p * P, R_L, p, 0);
    }
    /* m: read buffer and the file it reads from */
    char read_path[4096];
    snprintf(read_path, sizeof read_path, "%s/scen-read.dat", dir);
    write_file(read_path, R_MFILE, M_BLOCKS, 0);
    read_fd = open(read_path, O_RDONLY | O_CLOEXEC);
    if (read_fd < 0)
        die("open %s", read_path);
    rm = map_anon_fixed(carve(M_PAGES, P), M_PAGES * P, PROT_READ | PROT_WRITE, MAP_FIXED);
    for (unsigned p = 0; p < M_PAGES; p++)
        fill(rm + p * P, R_M, p, st_m[p] = 0);
    /* n: thread regions (zero until written) */
    for (int t = 0; t < 2; t++) {
        rt[t] = map_anon_fixed(carve(T_PAGES, P), T_PAGES * P, PROT_READ | PROT_WRITE,
                               MAP_FIXED);
        workers[t].mem = (volatile uint64_t *)rt[t];
    }
    for (int t = 0; t < 2; t++)
        if (pthread_create(&threads[t], NULL, worker_main, &workers[t]) != 0)
            die("pthread_create");
    /* h: the heap, last: nothing mallocs from here on */
    {
        uintptr_t cur = (uintptr_t)sbrk(0);
        if (sbrk((intptr_t)((P - cur % P) % P)) == (void *)-1)
            die("sbrk align");
        h_base = sbrk(0);
        if (sbrk((intptr_t)(H_PAGES * P)) == (void *)-1)
            die("sbrk grow");
        h_pages = H_PAGES;
        for (unsigned p = 0; p < H_PAGES; p++)
            fill(h_base + p * P, R_H, p, st_h[p] = 0);
    }
}

/* ---- phases */

static uint64_t rng_state;
static uint64_t rng(void)
{
    rng_state += 0x9E3779B97F4A7C15ULL;
    return mix64(rng_state);
}

static void phase_a(int k)
{
    rng_state = (uint64_t)k * 1000003ULL;
    for (int n = 0; n < 37; n++) {
        unsigned p = (unsigned)(rng() % A_PAGES);
        fill(ra + p * P, R_A, p, st_a[p] = (uint32_t)k);
    }
}

static void phase_b(int k)
{
    if (munmap(rb, B_PAGES * P) != 0)
        die("munmap b");
    map_anon_fixed(rb, B_PAGES * P, PROT_READ | PROT_WRITE, MAP_FIXED_NOREPLACE);
    for (unsigned p = 0; p < B_PAGES; p++) {
        if ((p + (unsigned)k) % 3 != 0)
            fill(rb + p * P, R_B, p, st_b[p] = (uint32_t)k);
        else
            st_b[p] = ZERO;
    }
}

static void phase_c(int k)
{
    c_mid = 8 + (unsigned long)(k % 4) * 2;
    map_anon_fixed(rc + c_mid * P, 8 * P, PROT_READ | PROT_WRITE, MAP_FIXED);
    for (unsigned j = 0; j < 8; j++) {
        unsigned long p = c_mid + j;
        if (j % 2 == 0)
            fill(rc + p * P, R_C, p, st_c[p] = (uint32_t)k);
        else
            st_c[p] = ZERO;
    }
    fill(rc, R_C, 0, st_c[0] = (uint32_t)k);
}

static void phase_d(int k)
{
    unsigned long grown = d_pages + 2;
    if (grown > D_ROOM)
        die("d out of room");
    if (munmap(rd + d_pages * P, 2 * P) != 0)
        die("munmap d room");
    void *r = mremap(rd, d_pages * P, grown * P, 0);
    if (r != rd)
        die("mremap grow d in place -> %p", r);
    fill(rd + d_pages * P, R_D, d_pages, st_d[d_pages] = (uint32_t)k);
    st_d[d_pages + 1] = ZERO;
    d_pages = grown;
    unsigned long old = (unsigned long)k % (d_pages - 2);
    fill(rd + old * P, R_D, old, st_d[old] = (uint32_t)k);
}

static void phase_e(int k)
{
    unsigned char *dst = re == re_slot[0] ? re_slot[1] : re_slot[0];
    void *r = mremap(re, E_PAGES * P, E_PAGES * P, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
    if (r != dst)
        die("mremap move e -> %p", r);
    map_anon_fixed(re, E_PAGES * P, PROT_NONE, MAP_FIXED_NOREPLACE); /* re-reserve */
    re = dst;
    unsigned p = (unsigned)k % E_PAGES;
    fill(re + p * P, R_E, p, st_e[p] = (uint32_t)k);
}

static void phase_f(int k)
{
    if (k % 2) {
        fill(rf + 5 * P, R_F, 5, st_f[5] = (uint32_t)k);
        fill(rf + 6 * P, R_F, 6, st_f[6] = (uint32_t)k);
        fill(rf, R_F, 0, st_f[0] = (uint32_t)k);
        if (mprotect(rf + 4 * P, 8 * P, PROT_READ) != 0)
            die("mprotect f RO");
    } else {
        if (mprotect(rf + 4 * P, 8 * P, PROT_READ | PROT_WRITE) != 0)
            die("mprotect f RW");
        unsigned p = 4 + (unsigned)k % 8;
        fill(rf + 7 * P, R_F, 7, st_f[7] = (uint32_t)k);
        fill(rf + p * P, R_F, p, st_f[p] = (uint32_t)k);
    }
}

static void phase_g(int k)
{
    for (unsigned n = 1; n <= 2; n++) {
        unsigned p = ((unsigned)k * 3 + n) % G_PAGES;
        fill(rg + p * P, R_G, p, st_g[p] = (uint32_t)k);
    }
    for (unsigned j = 0; j < 4; j++) {
        unsigned p = ((unsigned)k * 5 + j * 7 + 11) % G_PAGES;
        if (madvise(rg + p * P, P, MADV_DONTNEED) != 0)
            die("madvise DONTNEED");
        st_g[p] = ZERO;
    }
}

static void phase_h(int k)
{
    if (k % 2) {
        if (h_pages + 3 > H_MAX || sbrk((intptr_t)(3 * P)) == (void *)-1)
            die("sbrk +3");
        for (unsigned long p = h_pages; p < h_pages + 3; p++)
            fill(h_base + p * P, R_H, p, st_h[p] = (uint32_t)k);
        h_pages += 3;
    } else {
        if (sbrk(-(intptr_t)(2 * P)) == (void *)-1)
            die("sbrk -2");
        h_pages -= 2;
        if (sbrk((intptr_t)P) == (void *)-1)
            die("sbrk +1");
        st_h[h_pages] = ZERO; /* freed by the shrink: must read zero again */
        h_pages += 1;
    }
    fill(h_base + P, R_H, 1, st_h[1] = (uint32_t)k);
}

static void phase_i(int k)
{
    unsigned long n = 4 + (unsigned long)k % 5;
    unsigned char *r = mmap(NULL, n * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                            -1, 0);
    if (r == MAP_FAILED)
        die("mmap i");
    i_addr[k] = r;
    i_pages[k] = n;
    for (unsigned long p = 0; p < n; p++) {
        if (p < n - 1)
            fill(r + p * P, R_I, (uint64_t)k << 8 | p, st_i[k][p] = (uint32_t)k);
        else
            st_i[k][p] = ZERO;
    }
    if (k >= 2)
        fill(i_addr[k - 1], R_I, (uint64_t)(k - 1) << 8, st_i[k - 1][0] = (uint32_t)k);
}

static void phase_j(int k)
{
    unsigned c = (unsigned)k % J_CHUNKS;
    fill_v(j_frame[0] + c * (P / 8), R_J, c, st_j[0][c] = (uint32_t)k);
}

static void phase_k(int k)
{
    unsigned p1 = ((unsigned)k * 3) % K_PAGES, p2 = ((unsigned)k * 3 + 7) % K_PAGES;
    fill(rk + p1 * P, R_K, p1, st_k[p1] = (uint32_t)k);
    fill(rk + p2 * P, R_K, p2, st_k[p2] = (uint32_t)k);
}

static void phase_l(int k)
{
    unsigned p1 = ((unsigned)k * 37) % (L_PAGES / 2);
    unsigned p2 = L_PAGES / 2 + ((unsigned)k * 53) % (L_PAGES / 2);
    fill(rl + p1 * P, R_L, p1, st_l[p1] = (uint32_t)k);
    fill(rl + p2 * P, R_L, p2, st_l[p2] = (uint32_t)k);
}

static void phase_m(int k)
{
    unsigned p = ((unsigned)k * 3) % M_PAGES, b = ((unsigned)k * 5) % M_BLOCKS;
    if (pread(read_fd, rm + p * P, P, (off_t)b * (off_t)P) != (ssize_t)P)
        die("pread");
    st_m[p] = MBLOCK + b;
}

static void do_phase(int k)
{
    phase_a(k);
    phase_b(k);
    phase_c(k);
    phase_d(k);
    phase_e(k);
    phase_f(k);
    phase_g(k);
    phase_h(k);
    phase_i(k);
    phase_j(k);
    phase_k(k);
    phase_l(k);
    phase_m(k);
}

/* ---- verify */

static void verify(void)
{
    read_maps();
    for (unsigned p = 0; p < A_PAGES; p++)
        check_unit("a", R_A, p, ra + p * P, st_a[p]);
    for (unsigned p = 0; p < B_PAGES; p++)
        check_unit("b", R_B, p, rb + p * P, st_b[p]);
    check_vma("b", (uintptr_t)rb, "rw-p", (uintptr_t)rb, (uintptr_t)(rb + B_PAGES * P));
    for (unsigned p = 0; p < C_PAGES; p++)
        check_unit("c", R_C, p, rc + p * P, st_c[p]);
    for (unsigned p = 0; p < d_pages; p++)
        check_unit("d", R_D, p, rd + p * P, st_d[p]);
    check_vma("d", (uintptr_t)rd, "rw-p", (uintptr_t)rd, (uintptr_t)(rd + d_pages * P));
    check_vma("d-room", (uintptr_t)(rd + d_pages * P), "---p", 0, 0);
    for (unsigned p = 0; p < E_PAGES; p++)
        check_unit("e", R_E, p, re + p * P, st_e[p]);
    check_vma("e", (uintptr_t)re, "rw-p", (uintptr_t)re, (uintptr_t)(re + E_PAGES * P));
    check_vma("e-old", (uintptr_t)(re == re_slot[0] ? re_slot[1] : re_slot[0]), "---p", 0,
              0);
    for (unsigned p = 0; p < F_PAGES; p++)
        check_unit("f", R_F, p, rf + p * P, st_f[p]);
    check_vma("f-mid", (uintptr_t)(rf + 4 * P), phase % 2 ? "r--p" : "rw-p",
              (uintptr_t)(rf + 4 * P), phase % 2 ? (uintptr_t)(rf + 12 * P) : 0);
    check_vma("f", (uintptr_t)rf, "rw-p", 0, 0);
    for (unsigned p = 0; p < G_PAGES; p++)
        check_unit("g", R_G, p, rg + p * P, st_g[p]);
    for (unsigned p = 0; p < h_pages; p++)
        check_unit("h", R_H, p, h_base + p * P, st_h[p]);
    long brk_now = syscall(SYS_brk, 0);
    if ((unsigned char *)brk_now != h_base + h_pages * P)
        add_fail("h-brk 0 want=%p got=%#lx", (void *)(h_base + h_pages * P), brk_now);
    for (int k = 1; k <= phase; k++)
        for (unsigned long p = 0; p < i_pages[k]; p++)
            check_unit("i", R_I, (uint64_t)k << 8 | p, i_addr[k] + p * P, st_i[k][p]);
    for (int lv = 0; lv < j_levels; lv++)
        for (unsigned c = 0; c < J_CHUNKS; c++)
            check_unit("j", R_J, c, j_frame[lv] + c * (P / 8), st_j[lv][c]);
    for (unsigned p = 0; p < K_PAGES; p++)
        check_unit("k", R_K, p, rk + p * P, st_k[p]);
    {
        uintptr_t s, e;
        char pr[5], path[4200];
        if (!maps_find((uintptr_t)rk, &s, &e, pr, path, sizeof path) ||
            strcmp(pr, "rw-p") != 0 || strcmp(path, map_path) != 0)
            add_fail("k-vma 0 want=rw-p:%s got=%s:%s", map_path, pr, path);
    }
    for (unsigned p = 0; p < L_PAGES; p++)
        check_unit("l", R_L, p, rl + p * P, st_l[p]);
    for (unsigned p = 0; p < M_PAGES; p++)
        check_unit("m", R_M, p, rm + p * P, st_m[p]);
    check_threads();
    report();
}

/* ---- the main loop, one recursion level per phase (scenario j) */

static volatile int never;

/* bounded by MAXPHASE, which gcc cannot see */
#pragma GCC diagnostic ignored "-Winfinite-recursion"
static NOINLINE void level_loop(int level, int *seen1, int *seen2)
{
    volatile uint64_t frame[J_CHUNKS * P / 8];
    j_frame[level] = frame;
    for (unsigned c = 0; c < J_CHUNKS; c++)
        fill_v(frame + c * (P / 8), R_J, c, st_j[level][c] = (uint32_t)phase);
    j_levels = level + 1;
    if (level == 0) {
        say("layout a=%p b=%p c=%p d=%p e0=%p e1=%p f=%p g=%p h=%p k=%p l=%p m=%p t0=%p "
            "t1=%p\n", ra, rb, rc, rd, re_slot[0], re_slot[1], rf, rg, h_base, rk, rl, rm,
            rt[0], rt[1]);
        say("ready phase=0\n");
    } else {
        say("info phase=%d b=%p cmid=%p e=%p i=%p:%lu stack=%p\n", phase, rb, rc + c_mid * P,
            re, i_addr[phase], i_pages[phase], (void *)frame);
        say("phase=%d done\n", phase);
    }
    for (;;) {
        if (next_event(seen1, seen2) == 2) {
            verify();
            continue;
        }
        if (phase >= MAXPHASE) {
            say("phase limit\n");
            continue;
        }
        phase++;
        do_phase(phase);
        level_loop(level + 1, seen1, seen2);
        if (never) /* keeps frame live across the call: no sibling call */
            frame[0] = 0;
    }
}

int main(int argc, char **argv)
{
    setvbuf(stdout, outbuf, _IOFBF, sizeof outbuf);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_fault;
    sa.sa_flags = SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
    setup_signals();
    if (argc == 3 && strcmp(argv[1], "--pages") == 0)
        pages_main(strtoul(argv[2], NULL, 0));
    if (argc != 2) {
        fprintf(stderr, "usage: scenarios DIR | scenarios --pages K\n");
        return 2;
    }
    setup(argv[1]);
    int seen1 = 0, seen2 = 0;
    level_loop(0, &seen1, &seen2);
    return 0;
}
