/* Readiness of many descriptors for _multi.pyx: epoll on Linux, where the cost of a wait grows
 * with the descriptors that are ready, not with those that are watched; poll() elsewhere (its
 * cost grows with the watched ones, which is what a server of many clients avoids on Linux).
 *
 * Each descriptor is watched with a 64-bit value that a wait hands back with its events.
 * Level-triggered: a descriptor stays ready until it has been drained. Remove a descriptor
 * (dsvpn_poller_del) before closing it. All functions are static inline and never touch
 * Python. */
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

#if defined(__linux__)
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
