/* A model of kqueue(2) over poll(2), so that test_poller_backends.py builds and runs poller.h's
 * kqueue backend on every machine, BSD or libkqueue or neither. Level-triggered read and write
 * filters, one report per ready filter, EV_EOF on hang-up or error; one kqueue at a time. It
 * checks poller.h's own bookkeeping (which filters are registered, one report per descriptor);
 * what a real kqueue does is checked against libkqueue or a BSD. */
#ifndef KQUEUE_MODEL_EVENT_H
#define KQUEUE_MODEL_EVENT_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#define EVFILT_READ (-1)
#define EVFILT_WRITE (-2)
#define EV_ADD 0x0001
#define EV_DELETE 0x0002
#define EV_ERROR 0x4000
#define EV_EOF 0x8000

struct kevent {
    uintptr_t      ident;
    short          filter;
    unsigned short flags;
    unsigned int   fflags;
    intptr_t       data;
    void          *udata;
};

#define EV_SET(kevp, a, b, c, d, e, f)                   \
    do {                                                 \
        struct kevent *kev_ = (kevp);                    \
        kev_->ident         = (a);                       \
        kev_->filter        = (short) (b);               \
        kev_->flags         = (unsigned short) (c);      \
        kev_->fflags        = (unsigned int) (d);        \
        kev_->data          = (intptr_t) (e);            \
        kev_->udata         = (void *) (uintptr_t) (f);  \
    } while (0)

#define KQUEUE_MODEL_MAX 1024

static struct {
    int   fd;
    short filter;
} kqueue_model_notes[KQUEUE_MODEL_MAX];
static int kqueue_model_n;

static int kqueue(void)
{
    kqueue_model_n = 0;
    return open("/dev/null", O_RDONLY); /* a descriptor to close, as a real one */
}

static int kqueue_model_find(int fd, short filter)
{
    int i;
    for (i = 0; i < kqueue_model_n; i++) {
        if (kqueue_model_notes[i].fd == fd && kqueue_model_notes[i].filter == filter) {
            return i;
        }
    }
    return -1;
}

static int kevent(int kq, const struct kevent *changes, int nchanges, struct kevent *events,
                  int nevents, const struct timespec *timeout)
{
    static struct pollfd pfd[KQUEUE_MODEL_MAX];
    int                  i, k = 0, r;
    (void) kq;
    for (i = 0; i < nchanges; i++) {
        int fd = (int) changes[i].ident, at = kqueue_model_find(fd, changes[i].filter);
        if (fcntl(fd, F_GETFD) == -1) {
            errno = EBADF;
            return -1;
        }
        if (changes[i].flags & EV_DELETE) {
            if (at < 0) {
                errno = ENOENT;
                return -1;
            }
            kqueue_model_notes[at] = kqueue_model_notes[--kqueue_model_n];
        } else if ((changes[i].flags & EV_ADD) && at < 0) {
            if (kqueue_model_n == KQUEUE_MODEL_MAX) {
                errno = ENOMEM;
                return -1;
            }
            kqueue_model_notes[kqueue_model_n].fd       = fd;
            kqueue_model_notes[kqueue_model_n].filter   = changes[i].filter;
            kqueue_model_n++;
        }
    }
    if (nevents == 0) {
        return 0;
    }
    for (i = 0; i < kqueue_model_n; i++) {
        pfd[i].fd      = kqueue_model_notes[i].fd;
        pfd[i].events  = kqueue_model_notes[i].filter == EVFILT_READ ? POLLIN : POLLOUT;
        pfd[i].revents = 0;
    }
    r = poll(pfd, (nfds_t) kqueue_model_n,
             timeout == NULL ? -1
                             : (int) (timeout->tv_sec * 1000 + timeout->tv_nsec / 1000000));
    for (i = 0; r > 0 && i < kqueue_model_n && k < nevents; i++) {
        if (pfd[i].revents == 0) {
            continue;
        }
        EV_SET(&events[k], (uintptr_t) pfd[i].fd, kqueue_model_notes[i].filter,
               (pfd[i].revents & (POLLHUP | POLLERR)) ? EV_EOF : 0, 0, 0, 0);
        k++;
    }
    return r < 0 ? r : k;
}

#endif
