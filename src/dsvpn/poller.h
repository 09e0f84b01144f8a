/* Readiness of many descriptors for _multi.pyx: epoll on Linux and kqueue on macOS and the BSDs,
 * where the cost of a wait grows with the descriptors that are ready, not with those that are
 * watched; poll() elsewhere (its cost grows with the watched ones, which is what a server of
 * many clients avoids).
 *
 * Each descriptor is watched with a 64-bit value that a wait hands back with its events.
 * Level-triggered: a descriptor stays ready until it has been drained. Remove a descriptor
 * (dsvpn_poller_del) before closing it. A descriptor appears at most once in the reports of one
 * wait. All functions are static inline and never touch Python.
 *
 * The backend is chosen by the OS, or forced (tests build all three on Linux) by defining one
 * of DSVPN_POLLER_EPOLL, DSVPN_POLLER_KQUEUE (on Linux: libkqueue, -I/usr/include/kqueue
 * -lkqueue) or DSVPN_POLLER_POLL. */
#ifndef DSVPN_POLLER_H
#define DSVPN_POLLER_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DSVPN_PIN 1u
#define DSVPN_POUT 2u
#define DSVPN_PERR 4u /* error or hang-up: reading tells which */

struct dsvpn_pev {
    uint64_t data;
    uint32_t events;
};

#if !defined(DSVPN_POLLER_EPOLL) && !defined(DSVPN_POLLER_KQUEUE) && !defined(DSVPN_POLLER_POLL)
#if defined(__APPLE__) || defined(__FreeBSD__) || defined(__OpenBSD__) || defined(__NetBSD__) || \
    defined(__DragonFly__)
#define DSVPN_POLLER_KQUEUE 1
#elif defined(__linux__)
#define DSVPN_POLLER_EPOLL 1
#else
#define DSVPN_POLLER_POLL 1
#endif
#endif

#if defined(DSVPN_POLLER_EPOLL)
#include <sys/epoll.h>

struct dsvpn_poller {
    int                 fd;
    int                 cap;
    struct epoll_event *evs;
};

static inline struct dsvpn_poller *dsvpn_poller_new(int max_events)
{
    struct dsvpn_poller *p = (struct dsvpn_poller *) calloc(1, sizeof *p);
    if (p == NULL) {
        return NULL;
    }
    p->cap = max_events;
    p->evs = (struct epoll_event *) calloc((size_t) max_events, sizeof *p->evs);
    p->fd  = epoll_create1(EPOLL_CLOEXEC);
    if (p->evs == NULL || p->fd < 0) {
        if (p->fd >= 0) {
            close(p->fd);
        }
        free(p->evs);
        free(p);
        return NULL;
    }
    return p;
}

static inline void dsvpn_poller_free(struct dsvpn_poller *p)
{
    if (p != NULL) {
        close(p->fd);
        free(p->evs);
        free(p);
    }
}

static inline uint32_t dsvpn_epoll_events(uint32_t events)
{
    return ((events & DSVPN_PIN) ? (uint32_t) EPOLLIN : 0u) |
           ((events & DSVPN_POUT) ? (uint32_t) EPOLLOUT : 0u);
}

/* Watch fd for events (0: watched, but reported only on error or hang-up). */
static inline int dsvpn_poller_add(struct dsvpn_poller *p, int fd, uint32_t events, uint64_t data)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events   = dsvpn_epoll_events(events);
    ev.data.u64 = data;
    return epoll_ctl(p->fd, EPOLL_CTL_ADD, fd, &ev);
}

static inline int dsvpn_poller_mod(struct dsvpn_poller *p, int fd, uint32_t events, uint64_t data)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events   = dsvpn_epoll_events(events);
    ev.data.u64 = data;
    return epoll_ctl(p->fd, EPOLL_CTL_MOD, fd, &ev);
}

static inline int dsvpn_poller_del(struct dsvpn_poller *p, int fd)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    return epoll_ctl(p->fd, EPOLL_CTL_DEL, fd, &ev);
}

/* Wait up to timeout_ms (negative: forever); fills out[0..n) and returns n, or -1 (errno). */
static inline int dsvpn_poller_wait(struct dsvpn_poller *p, struct dsvpn_pev *out, int timeout_ms)
{
    int i, n = epoll_wait(p->fd, p->evs, p->cap, timeout_ms);
    for (i = 0; i < n; i++) {
        uint32_t e    = p->evs[i].events;
        out[i].data   = p->evs[i].data.u64;
        out[i].events = ((e & EPOLLIN) ? DSVPN_PIN : 0u) | ((e & EPOLLOUT) ? DSVPN_POUT : 0u) |
                        ((e & (EPOLLERR | EPOLLHUP)) ? DSVPN_PERR : 0u);
    }
    return n;
}

#elif defined(DSVPN_POLLER_KQUEUE)
#include <fcntl.h>
#include <sys/types.h>
#include <sys/event.h>
#include <sys/time.h>

/* One read and one write filter per descriptor, each registered only while it is wanted (so a
 * mod that leaves a filter as it was costs no system call). The value a wait hands back and the
 * filters that are registered live in a table indexed by descriptor, which also merges the two
 * filters of one descriptor into a single report. Known difference from epoll: events 0
 * registers no filter, so hang-up is then not reported (_multi.pyx never watches with 0). */
struct dsvpn_kq_fd {
    uint64_t data;
    uint32_t events; /* the registered filters: DSVPN_PIN, DSVPN_POUT */
    uint32_t epoch;  /* the wait that last reported it; its report is then out[slot] */
    int      slot;
    int      watched;
};

struct dsvpn_poller {
    int                 fd;
    int                 cap;
    int                 nfds; /* entries of tab */
    uint32_t            epoch;
    struct kevent      *evs;
    struct dsvpn_kq_fd *tab;
};

static inline struct dsvpn_poller *dsvpn_poller_new(int max_events)
{
    struct dsvpn_poller *p = (struct dsvpn_poller *) calloc(1, sizeof *p);
    if (p == NULL) {
        return NULL;
    }
    p->cap = max_events;
    p->evs = (struct kevent *) calloc((size_t) max_events, sizeof *p->evs);
    p->fd  = kqueue();
    if (p->evs == NULL || p->fd < 0 || fcntl(p->fd, F_SETFD, FD_CLOEXEC) != 0) {
        if (p->fd >= 0) {
            close(p->fd);
        }
        free(p->evs);
        free(p);
        return NULL;
    }
    return p;
}

static inline void dsvpn_poller_free(struct dsvpn_poller *p)
{
    if (p != NULL) {
        close(p->fd);
        free(p->evs);
        free(p->tab);
        free(p);
    }
}

static inline int dsvpn_kq_change(struct dsvpn_poller *p, int fd, int filter, int flags)
{
    struct kevent ch;
    EV_SET(&ch, (uintptr_t) fd, filter, flags, 0, 0, 0);
    /* No room for receipts: an error is returned as -1 and errno. */
    return kevent(p->fd, &ch, 1, NULL, 0, NULL);
}

/* Change the registered filters of fd from e->events to `to`. On failure the filters it added
 * are removed again, and e->events tells what is registered. */
static inline int dsvpn_kq_set(struct dsvpn_poller *p, int fd, struct dsvpn_kq_fd *e, uint32_t to)
{
    uint32_t added = 0u;
    int      err;
    if ((to & DSVPN_PIN) && !(e->events & DSVPN_PIN)) {
        if (dsvpn_kq_change(p, fd, EVFILT_READ, EV_ADD) != 0) {
            return -1;
        }
        added |= DSVPN_PIN;
    }
    if ((to & DSVPN_POUT) && !(e->events & DSVPN_POUT)) {
        if (dsvpn_kq_change(p, fd, EVFILT_WRITE, EV_ADD) != 0) {
            err = errno;
            if (added) {
                (void) dsvpn_kq_change(p, fd, EVFILT_READ, EV_DELETE);
            }
            errno = err;
            return -1;
        }
        added |= DSVPN_POUT;
    }
    e->events |= added;
    if (!(to & DSVPN_PIN) && (e->events & DSVPN_PIN)) {
        if (dsvpn_kq_change(p, fd, EVFILT_READ, EV_DELETE) != 0) {
            return -1;
        }
        e->events &= ~DSVPN_PIN;
    }
    if (!(to & DSVPN_POUT) && (e->events & DSVPN_POUT)) {
        if (dsvpn_kq_change(p, fd, EVFILT_WRITE, EV_DELETE) != 0) {
            return -1;
        }
        e->events &= ~DSVPN_POUT;
    }
    return 0;
}

static inline struct dsvpn_kq_fd *dsvpn_kq_entry(const struct dsvpn_poller *p, int fd)
{
    if (fd < 0 || fd >= p->nfds || !p->tab[fd].watched) {
        return NULL;
    }
    return &p->tab[fd];
}

/* Watch fd for events (0: watched, but reported never; see above). */
static inline int dsvpn_poller_add(struct dsvpn_poller *p, int fd, uint32_t events, uint64_t data)
{
    struct dsvpn_kq_fd *e;
    if (fd < 0) {
        errno = EBADF;
        return -1;
    }
    if (fd >= p->nfds) {
        int                 nfds = p->nfds ? p->nfds : 64;
        struct dsvpn_kq_fd *tab;
        while (nfds <= fd) {
            nfds *= 2;
        }
        tab = (struct dsvpn_kq_fd *) realloc(p->tab, (size_t) nfds * sizeof *tab);
        if (tab == NULL) {
            errno = ENOMEM;
            return -1;
        }
        memset(tab + p->nfds, 0, (size_t) (nfds - p->nfds) * sizeof *tab);
        p->tab  = tab;
        p->nfds = nfds;
    }
    e = &p->tab[fd];
    if (e->watched) {
        errno = EEXIST;
        return -1;
    }
    e->events = 0u;
    if (dsvpn_kq_set(p, fd, e, events & (DSVPN_PIN | DSVPN_POUT)) != 0) {
        return -1;
    }
    e->data    = data;
    e->epoch   = 0u;
    e->watched = 1;
    return 0;
}

static inline int dsvpn_poller_mod(struct dsvpn_poller *p, int fd, uint32_t events, uint64_t data)
{
    struct dsvpn_kq_fd *e = dsvpn_kq_entry(p, fd);
    if (e == NULL) {
        errno = ENOENT;
        return -1;
    }
    if (dsvpn_kq_set(p, fd, e, events & (DSVPN_PIN | DSVPN_POUT)) != 0) {
        return -1;
    }
    e->data = data;
    return 0;
}

/* Forgets fd even when the kernel refuses (a descriptor closed too early has lost its filters
 * anyway); -1 then tells of it. */
static inline int dsvpn_poller_del(struct dsvpn_poller *p, int fd)
{
    struct dsvpn_kq_fd *e = dsvpn_kq_entry(p, fd);
    int                 r = 0, err = 0;
    if (e == NULL) {
        errno = ENOENT;
        return -1;
    }
    if ((e->events & DSVPN_PIN) && dsvpn_kq_change(p, fd, EVFILT_READ, EV_DELETE) != 0) {
        r   = -1;
        err = errno;
    }
    if ((e->events & DSVPN_POUT) && dsvpn_kq_change(p, fd, EVFILT_WRITE, EV_DELETE) != 0) {
        r   = -1;
        err = errno;
    }
    memset(e, 0, sizeof *e);
    if (r != 0) {
        errno = err;
    }
    return r;
}

static inline int dsvpn_poller_wait(struct dsvpn_poller *p, struct dsvpn_pev *out, int timeout_ms)
{
    struct timespec ts, *tsp = NULL;
    int             i, n, k = 0;
    if (timeout_ms >= 0) {
        ts.tv_sec  = timeout_ms / 1000;
        ts.tv_nsec = (long) (timeout_ms % 1000) * 1000000L;
        tsp        = &ts;
    }
    n = kevent(p->fd, NULL, 0, p->evs, p->cap, tsp);
    if (n <= 0) {
        return n;
    }
    if (++p->epoch == 0u) { /* wrapped: no entry may look reported by this wait */
        for (i = 0; i < p->nfds; i++) {
            p->tab[i].epoch = 0u;
        }
        p->epoch = 1u;
    }
    for (i = 0; i < n; i++) {
        const struct kevent *kev = &p->evs[i];
        struct dsvpn_kq_fd  *e   = dsvpn_kq_entry(p, (int) kev->ident);
        uint32_t             ev;
        if (e == NULL) {
            continue;
        }
        ev = (kev->filter == EVFILT_READ ? DSVPN_PIN : 0u) |
             (kev->filter == EVFILT_WRITE ? DSVPN_POUT : 0u) |
             ((kev->flags & (EV_EOF | EV_ERROR)) ? DSVPN_PERR : 0u);
        if (e->epoch == p->epoch) {
            out[e->slot].events |= ev;
            continue;
        }
        e->epoch      = p->epoch;
        e->slot       = k;
        out[k].data   = e->data;
        out[k].events = ev;
        k++;
    }
    return k;
}

#else /* poll() */
#include <poll.h>

struct dsvpn_pentry {
    int      fd;
    uint32_t events;
    uint64_t data;
};

struct dsvpn_poller {
    int                  cap;   /* of the result array */
    int                  n;     /* watched descriptors */
    int                  alloc; /* room in ents and pfd */
    struct dsvpn_pentry *ents;
    struct pollfd       *pfd;
};

static inline struct dsvpn_poller *dsvpn_poller_new(int max_events)
{
    struct dsvpn_poller *p = (struct dsvpn_poller *) calloc(1, sizeof *p);
    if (p != NULL) {
        p->cap = max_events;
    }
    return p;
}

static inline void dsvpn_poller_free(struct dsvpn_poller *p)
{
    if (p != NULL) {
        free(p->ents);
        free(p->pfd);
        free(p);
    }
}

static inline int dsvpn_poller_find(const struct dsvpn_poller *p, int fd)
{
    int i;
    for (i = 0; i < p->n; i++) {
        if (p->ents[i].fd == fd) {
            return i;
        }
    }
    return -1;
}

static inline int dsvpn_poller_add(struct dsvpn_poller *p, int fd, uint32_t events, uint64_t data)
{
    if (dsvpn_poller_find(p, fd) >= 0) {
        errno = EEXIST;
        return -1;
    }
    if (p->n == p->alloc) {
        int                  alloc = p->alloc ? p->alloc * 2 : 16;
        struct dsvpn_pentry *ents =
            (struct dsvpn_pentry *) realloc(p->ents, (size_t) alloc * sizeof *ents);
        struct pollfd *pfd;
        if (ents == NULL) {
            errno = ENOMEM;
            return -1;
        }
        p->ents = ents;
        pfd     = (struct pollfd *) realloc(p->pfd, (size_t) alloc * sizeof *pfd);
        if (pfd == NULL) {
            errno = ENOMEM;
            return -1;
        }
        p->pfd   = pfd;
        p->alloc = alloc;
    }
    p->ents[p->n].fd     = fd;
    p->ents[p->n].events = events;
    p->ents[p->n].data   = data;
    p->n++;
    return 0;
}

static inline int dsvpn_poller_mod(struct dsvpn_poller *p, int fd, uint32_t events, uint64_t data)
{
    int i = dsvpn_poller_find(p, fd);
    if (i < 0) {
        errno = ENOENT;
        return -1;
    }
    p->ents[i].events = events;
    p->ents[i].data   = data;
    return 0;
}

static inline int dsvpn_poller_del(struct dsvpn_poller *p, int fd)
{
    int i = dsvpn_poller_find(p, fd);
    if (i < 0) {
        errno = ENOENT;
        return -1;
    }
    p->ents[i] = p->ents[--p->n];
    return 0;
}

static inline int dsvpn_poller_wait(struct dsvpn_poller *p, struct dsvpn_pev *out, int timeout_ms)
{
    int i, r, k = 0;
    for (i = 0; i < p->n; i++) {
        p->pfd[i].fd     = p->ents[i].fd;
        p->pfd[i].events = (short) (((p->ents[i].events & DSVPN_PIN) ? POLLIN : 0) |
                                    ((p->ents[i].events & DSVPN_POUT) ? POLLOUT : 0));
        p->pfd[i].revents = 0;
    }
    r = poll(p->pfd, (nfds_t) p->n, timeout_ms);
    if (r <= 0) {
        return r;
    }
    for (i = 0; i < p->n && k < p->cap; i++) {
        short e = p->pfd[i].revents;
        if (e == 0) {
            continue;
        }
        out[k].data   = p->ents[i].data;
        out[k].events = ((e & POLLIN) ? DSVPN_PIN : 0u) | ((e & POLLOUT) ? DSVPN_POUT : 0u) |
                        ((e & (POLLERR | POLLHUP | POLLNVAL)) ? DSVPN_PERR : 0u);
        k++;
    }
    return k;
}
#endif

#endif
