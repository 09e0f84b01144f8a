/* Small platform shims for _loop.pyx: everything that differs between Linux, macOS and the
 * BSDs lives here, so the loop itself stays platform-free. All functions are static inline and
 * never touch Python. */
#ifndef DSVPN_LOOP_SYS_H
#define DSVPN_LOOP_SYS_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/random.h>
#endif

#ifdef MSG_NOSIGNAL
#define DSVPN_MSG_NOSIGNAL MSG_NOSIGNAL
#else
#define DSVPN_MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is set in dsvpn_tcp_opts instead */
#endif

/* Fill buf with n bytes from the OS CSPRNG; 0 on success, -1 on failure. */
static inline int dsvpn_random(uint8_t *buf, size_t n)
{
#if defined(__linux__)
    while (n > 0) {
        ssize_t r = getrandom(buf, n, 0);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        buf += r;
        n -= (size_t) r;
    }
    return 0;
#else
    arc4random_buf(buf, n);
    return 0;
#endif
}

static inline int64_t dsvpn_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline int64_t dsvpn_wall_s(void)
{
    return (int64_t) time(NULL);
}

static inline int dsvpn_set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) {
        return -1;
    }
    return (fl & O_NONBLOCK) ? 0 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static inline void dsvpn_set_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFD);
    if (fl >= 0) {
        (void) fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
    }
}

/* protocol.md section 8 options plus TCP_NODELAY everywhere; every error is ignored. */
static inline void dsvpn_tcp_opts(int fd)
{
    int on = 1;
    (void) on;
    (void) setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
#ifdef TCP_QUICKACK
    (void) setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &on, sizeof on);
#endif
    (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
#ifdef TCP_CONGESTION
    {
        static const char cc[] = "bbr";
        (void) setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, cc, (socklen_t) (sizeof cc - 1));
    }
#endif
#ifdef TCP_NOTSENT_LOWAT
    {
        int lowat = 131072;
        (void) setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof lowat);
    }
#endif
#ifdef TCP_USER_TIMEOUT
    {
        unsigned int uto = 60000;
        (void) setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &uto, sizeof uto);
    }
#endif
#if defined(__linux__) && defined(SO_MARK)
    {
        int mark = 42069;
        (void) setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof mark);
    }
#endif
#ifdef SO_NOSIGPIPE
    (void) setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &on, sizeof on);
#endif
}

/* Normalise a peer address: key16 gets the IPv6 form (IPv4 as ::ffff:a.b.c.d) so that an
 * IPv4 client seen through a dual-stack listener compares equal to itself; text gets the
 * human form (IPv4-mapped addresses are printed as plain IPv4). */
static inline int dsvpn_addr_norm(const struct sockaddr_storage *ss, uint8_t key16[16],
                                  char *text, size_t textlen)
{
    static const uint8_t mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *) ss;
        memcpy(key16, mapped, 12);
        memcpy(key16 + 12, &a->sin_addr, 4);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *) ss;
        memcpy(key16, &a->sin6_addr, 16);
    } else {
        memset(key16, 0, 16);
        snprintf(text, textlen, "(unknown)");
        return -1;
    }
    if (memcmp(key16, mapped, 12) == 0) {
        if (inet_ntop(AF_INET, key16 + 12, text, (socklen_t) textlen) == NULL) {
            snprintf(text, textlen, "(unknown)");
        }
    } else if (inet_ntop(AF_INET6, key16, text, (socklen_t) textlen) == NULL) {
        snprintf(text, textlen, "(unknown)");
    }
    return 0;
}

/* Accept one connection as a non-blocking, close-on-exec socket; fills the peer address. */
static inline int dsvpn_accept(int lfd, uint8_t key16[16], char *text, size_t textlen)
{
    struct sockaddr_storage ss;
    socklen_t               len = sizeof ss;
    int                     fd;

    memset(&ss, 0, sizeof ss);
#if defined(__linux__) || defined(__FreeBSD__) || defined(__OpenBSD__) || defined(__NetBSD__)
    fd = accept4(lfd, (struct sockaddr *) &ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
    fd = accept(lfd, (struct sockaddr *) &ss, &len);
    if (fd >= 0) {
        dsvpn_set_cloexec(fd);
        if (dsvpn_set_nonblock(fd) != 0) {
            close(fd);
            return -1;
        }
    }
#endif
    if (fd >= 0) {
        dsvpn_addr_norm(&ss, key16, text, textlen);
    }
    return fd;
}

static inline int dsvpn_peer(int fd, uint8_t key16[16], char *text, size_t textlen)
{
    struct sockaddr_storage ss;
    socklen_t               len = sizeof ss;

    memset(&ss, 0, sizeof ss);
    if (getpeername(fd, (struct sockaddr *) &ss, &len) != 0) {
        memset(key16, 0, 16);
        snprintf(text, textlen, "(unknown)");
        return -1;
    }
    return dsvpn_addr_norm(&ss, key16, text, textlen);
}

static inline ssize_t dsvpn_send(int fd, const void *buf, size_t len)
{
    return send(fd, buf, len, DSVPN_MSG_NOSIGNAL);
}

static inline int dsvpn_would_block(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK;
}

#endif
