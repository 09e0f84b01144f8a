/* Drives src/dsvpn/poller.h through pipes and socket pairs and prints what each wait reported,
 * one line per check; test_poller_backends.py builds it once per backend (epoll, kqueue through
 * libkqueue, poll) and expects the same lines from each. */
#define _DEFAULT_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/socket.h>
#include <time.h>

#include "poller.h"

#define CAP 64
#define MANY 100 /* 200 descriptors: within macOS's default limit of 256 */

static struct dsvpn_pev out[CAP];

static void die(const char *what)
{
    printf("FAIL %s (errno %d)\n", what, errno);
    exit(1);
}

static void nonblock(int fd)
{
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0) {
        die("fcntl");
    }
}

static void pair(int sv[2])
{
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
        die("socketpair");
    }
    nonblock(sv[0]);
    nonblock(sv[1]);
}

static void put(int fd)
{
    if (write(fd, "x", 1) != 1) {
        die("write");
    }
}

static void drain(int fd)
{
    char buf[256];
    while (read(fd, buf, sizeof buf) > 0) {
    }
}

/* One wait; prints "<label>: n=N" and, for each report, its value and events. */
static int show(struct dsvpn_poller *p, const char *label, int timeout_ms)
{
    int i, n = dsvpn_poller_wait(p, out, timeout_ms);
    printf("%s: n=%d", label, n);
    for (i = 0; i < n; i++) {
        uint32_t e = out[i].events;
        printf(" [%#llx%s%s%s]", (unsigned long long) out[i].data, (e & DSVPN_PIN) ? " in" : "",
               (e & DSVPN_POUT) ? " out" : "", (e & DSVPN_PERR) ? " err" : "");
    }
    printf("\n");
    return n;
}

/* Like show, for a hang-up: whether the one report has DSVPN_PERR (readability may differ). */
static void show_err(struct dsvpn_poller *p, const char *label)
{
    int n = dsvpn_poller_wait(p, out, 1000);
    printf("%s: n=%d data=%#llx err=%d\n", label, n, n > 0 ? (unsigned long long) out[0].data : 0,
           n > 0 && (out[0].events & DSVPN_PERR) ? 1 : 0);
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(void)
{
    struct dsvpn_poller *p = dsvpn_poller_new(CAP);
    int                  pf[2], a[2], h[2], many[MANY][2];
    int                  i, r, seen[MANY], total, waits, most;
    long long            t0;
    if (p == NULL) {
        die("dsvpn_poller_new");
    }
    setvbuf(stdout, NULL, _IONBF, 0);

    show(p, "empty", 0);
    t0 = now_ms();
    show(p, "empty 100 ms", 100);
    printf("waited at least 90 ms: %d\n", now_ms() - t0 >= 90);

    /* A pipe: readable once written, and level-triggered. */
    if (pipe(pf) != 0) {
        die("pipe");
    }
    nonblock(pf[0]);
    if (dsvpn_poller_add(p, pf[0], DSVPN_PIN, 0x100000001ull) != 0) {
        die("add pipe");
    }
    show(p, "pipe idle", 0);
    put(pf[1]);
    show(p, "pipe written", 0);
    show(p, "pipe still unread", 0);
    drain(pf[0]);
    show(p, "pipe drained", 0);
    put(pf[1]);
    close(pf[1]);
    show_err(p, "pipe writer closed");
    drain(pf[0]);
    if (dsvpn_poller_del(p, pf[0]) != 0) {
        die("del pipe");
    }
    close(pf[0]);

    /* A socket pair: read only, then read and write, back, write only, and removed. */
    pair(a);
    if (dsvpn_poller_add(p, a[0], DSVPN_PIN, 0xa0) != 0) {
        die("add a");
    }
    show(p, "sock read, idle", 0);
    if (dsvpn_poller_mod(p, a[0], DSVPN_PIN | DSVPN_POUT, 0xa1) != 0) {
        die("mod a");
    }
    show(p, "sock read+write, idle", 0);
    put(a[1]);
    show(p, "sock read+write, written", 0);
    if (dsvpn_poller_mod(p, a[0], DSVPN_PIN, 0xa2) != 0) {
        die("mod a");
    }
    show(p, "sock back to read", 0);
    if (dsvpn_poller_mod(p, a[0], DSVPN_POUT, 0xa3) != 0) {
        die("mod a");
    }
    show(p, "sock write only, unread", 0);
    if (dsvpn_poller_mod(p, a[0], 0, 0xa4) != 0) {
        die("mod a");
    }
    show(p, "sock no events, unread", 0);
    if (dsvpn_poller_mod(p, a[0], DSVPN_PIN, 0xa5) != 0) {
        die("mod a");
    }
    show(p, "sock read again", 0);
    if (dsvpn_poller_del(p, a[0]) != 0) {
        die("del a");
    }
    show(p, "sock removed", 0);

    /* What epoll refuses, refused alike. */
    r = dsvpn_poller_del(p, a[0]);
    printf("del again: %d %s\n", r, r != 0 && errno == ENOENT ? "ENOENT" : "?");
    r = dsvpn_poller_mod(p, a[0], DSVPN_PIN, 0);
    printf("mod removed: %d %s\n", r, r != 0 && errno == ENOENT ? "ENOENT" : "?");
    r = dsvpn_poller_add(p, a[0], DSVPN_PIN, 0xa6);
    printf("add again: %d\n", r);
    r = dsvpn_poller_add(p, a[0], DSVPN_PIN, 0xa7);
    printf("add twice: %d %s\n", r, r != 0 && errno == EEXIST ? "EEXIST" : "?");
    show(p, "sock re-added", 0);
    drain(a[0]);
    show(p, "sock drained", 0);

    /* A hang-up: the other end closed. */
    pair(h);
    if (dsvpn_poller_add(p, h[0], DSVPN_PIN, 0xb0) != 0) {
        die("add h");
    }
    close(h[1]);
    show_err(p, "peer closed");
    if (dsvpn_poller_del(p, h[0]) != 0) {
        die("del h");
    }
    close(h[0]);

    /* Many descriptors, more ready (75) than one wait reports (CAP): each is reported until
     * drained, and only those. */
    for (i = 0; i < MANY; i++) {
        pair(many[i]);
        if (dsvpn_poller_add(p, many[i][0], DSVPN_PIN, 0x1000 + (uint64_t) i) != 0) {
            die("add many");
        }
        if (i % 4 != 3) {
            put(many[i][1]);
        }
        seen[i] = 0;
    }
    total = waits = most = 0;
    while ((r = dsvpn_poller_wait(p, out, 0)) > 0) {
        waits++;
        most = r > most ? r : most;
        for (i = 0; i < r; i++) {
            int k = (int) (out[i].data - 0x1000);
            if (k < 0 || k >= MANY || out[i].events != DSVPN_PIN) {
                die("many: a report of no such descriptor");
            }
            seen[k]++;
            total++;
            drain(many[k][0]);
        }
    }
    for (i = 0, r = 0; i < MANY; i++) {
        r += (i % 4 != 3) == (seen[i] == 1);
    }
    printf("many: %d watched, %d reported, %d as expected, %d waits, at most %d per wait\n",
           MANY, total, r, waits, most);
    for (i = 0; i < MANY; i++) {
        if (dsvpn_poller_del(p, many[i][0]) != 0) {
            die("del many");
        }
        close(many[i][0]);
        close(many[i][1]);
    }
    show(p, "all removed", 0);

    close(a[0]);
    close(a[1]);
    dsvpn_poller_free(p);
    printf("done\n");
    return 0;
}
