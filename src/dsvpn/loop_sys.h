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
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
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

/* The TCP options of docs/protocol.md, TCP options, plus TCP_NODELAY everywhere. mark != 0 sets
 * SO_MARK (Linux), so that the routing rules can keep the tunnel's own connection out of the
 * tunnel; a failure to set it is the only error reported (-1, errno set), since without it the
 * tunnel would route into itself. Every other error is ignored: those options only tune. */
static inline int dsvpn_tcp_opts(int fd, int mark, unsigned int user_timeout_ms, int notsent_lowat)
{
    int on = 1;
    (void) on;
    (void) user_timeout_ms;
    (void) notsent_lowat;
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
    (void) setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &notsent_lowat, sizeof notsent_lowat);
#endif
#ifdef TCP_USER_TIMEOUT
    (void) setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof user_timeout_ms);
#endif
#ifdef SO_NOSIGPIPE
    (void) setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &on, sizeof on);
#endif
    if (mark != 0) {
#if defined(__linux__) && defined(SO_MARK)
        return setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof mark);
#endif
    }
    return 0;
}

/* The smallest round-trip time seen on a TCP connection (the path's own, without the queues
 * and delayed ACKs in the smoothed one), in microseconds; -1 where the platform does not tell
 * (the loop then leaves the receive buffer to the kernel). */
#define DSVPN_TCPI_MIN_RTT_AT 148 /* offset of tcpi_min_rtt in Linux's struct tcp_info (4.10+),
                                    which libc's copy of the struct stops short of */
static inline int64_t dsvpn_tcp_min_rtt_us(int fd)
{
#if defined(__linux__) && defined(TCP_INFO)
    union {
        struct tcp_info ti;
        uint8_t         raw[256];
    } u;
    socklen_t len = sizeof u;
    uint32_t  min_rtt;
    memset(&u, 0, sizeof u);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &u, &len) != 0) {
        return -1;
    }
    if (len >= DSVPN_TCPI_MIN_RTT_AT + 4) {
        memcpy(&min_rtt, u.raw + DSVPN_TCPI_MIN_RTT_AT, 4);
        if (min_rtt != 0 && min_rtt != UINT32_MAX) {
            return (int64_t) min_rtt;
        }
    }
    return (int64_t) u.ti.tcpi_rtt;
#else
    (void) fd;
    return -1;
#endif
}

/* Set the receive buffer of a socket: what it may hold unread plus what is still on its way
 * (Linux doubles the value for its bookkeeping, and no longer grows the buffer by itself).
 * SO_RCVBUFFORCE, so that net.core.rmem_max does not cap it; 0, or -1 if that is not allowed
 * (not root, not Linux): the caller then leaves the buffer to the kernel. */
static inline int dsvpn_set_rcvbuf(int fd, int bytes)
{
#ifdef SO_RCVBUFFORCE
    return setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes);
#else
    (void) fd;
    (void) bytes;
    return -1;
#endif
}

/* Bytes waiting unread in a socket's receive queue, or -1. */
static inline ssize_t dsvpn_unread(int fd)
{
    int n = 0;
    return ioctl(fd, FIONREAD, &n) == 0 ? (ssize_t) n : -1;
}

#define DSVPN_IP_TEXT 46       /* INET6_ADDRSTRLEN */
#define DSVPN_ENDPOINT_TEXT 56 /* "[" ip "]:" port */

/* A peer's address: key is the IPv6 form (IPv4 as ::ffff:a.b.c.d), so that an IPv4 client
 * seen through a dual-stack listener compares equal to itself; ip is the human form
 * (IPv4-mapped addresses printed as plain IPv4) and endpoint adds the port ("1.2.3.4:5",
 * "[::1]:5"). */
struct dsvpn_addr {
    uint8_t key[16];
    char    ip[DSVPN_IP_TEXT];
    char    endpoint[DSVPN_ENDPOINT_TEXT];
};

static inline int dsvpn_addr_norm(const struct sockaddr_storage *ss, struct dsvpn_addr *out)
{
    static const uint8_t mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
    unsigned int         port;

    memset(out, 0, sizeof *out);
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *) ss;
        memcpy(out->key, mapped, 12);
        memcpy(out->key + 12, &a->sin_addr, 4);
        port = ntohs(a->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *) ss;
        memcpy(out->key, &a->sin6_addr, 16);
        port = ntohs(a->sin6_port);
    } else {
        snprintf(out->ip, sizeof out->ip, "(unknown)");
        snprintf(out->endpoint, sizeof out->endpoint, "(unknown)");
        return -1;
    }
    if (memcmp(out->key, mapped, 12) == 0) {
        if (inet_ntop(AF_INET, out->key + 12, out->ip, (socklen_t) sizeof out->ip) == NULL) {
            snprintf(out->ip, sizeof out->ip, "(unknown)");
        }
        snprintf(out->endpoint, sizeof out->endpoint, "%s:%u", out->ip, port);
    } else {
        if (inet_ntop(AF_INET6, out->key, out->ip, (socklen_t) sizeof out->ip) == NULL) {
            snprintf(out->ip, sizeof out->ip, "(unknown)");
        }
        snprintf(out->endpoint, sizeof out->endpoint, "[%s]:%u", out->ip, port);
    }
    return 0;
}

/* Accept one connection as a non-blocking, close-on-exec socket; fills the peer address. */
static inline int dsvpn_accept(int lfd, struct dsvpn_addr *peer)
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
        dsvpn_addr_norm(&ss, peer);
    }
    return fd;
}

static inline int dsvpn_peer(int fd, struct dsvpn_addr *peer)
{
    struct sockaddr_storage ss;
    socklen_t               len = sizeof ss;

    memset(&ss, 0, sizeof ss);
    if (getpeername(fd, (struct sockaddr *) &ss, &len) != 0) {
        memset(peer, 0, sizeof *peer);
        snprintf(peer->ip, sizeof peer->ip, "(unknown)");
        snprintf(peer->endpoint, sizeof peer->endpoint, "(unknown)");
        return -1;
    }
    return dsvpn_addr_norm(&ss, peer);
}

/* I/O on non-blocking descriptors, retried on EINTR. Each returns the byte count (0 = end of
 * file for the reads), DSVPN_IO_AGAIN when the call would block, or -1 with errno set. */
#define DSVPN_IO_AGAIN (-2)

static inline ssize_t dsvpn_io_result(ssize_t n)
{
    if (n >= 0) {
        return n;
    }
    return (errno == EAGAIN || errno == EWOULDBLOCK) ? DSVPN_IO_AGAIN : -1;
}

static inline ssize_t dsvpn_read(int fd, void *buf, size_t len)
{
    ssize_t n;
    do {
        n = read(fd, buf, len);
    } while (n < 0 && errno == EINTR);
    return dsvpn_io_result(n);
}

/* Read and discard what a non-blocking descriptor holds (a wake pipe). */
static inline void dsvpn_drain(int fd)
{
    uint8_t buf[256];
    while (dsvpn_read(fd, buf, sizeof buf) > 0) {
    }
}

static inline ssize_t dsvpn_readv(int fd, const struct iovec *iov, int iovcnt)
{
    ssize_t n;
    do {
        n = readv(fd, iov, iovcnt);
    } while (n < 0 && errno == EINTR);
    return dsvpn_io_result(n);
}

static inline ssize_t dsvpn_write(int fd, const void *buf, size_t len)
{
    ssize_t n;
    do {
        n = write(fd, buf, len);
    } while (n < 0 && errno == EINTR);
    return dsvpn_io_result(n);
}

static inline ssize_t dsvpn_send(int fd, const void *buf, size_t len)
{
    ssize_t n;
    do {
        n = send(fd, buf, len, DSVPN_MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return dsvpn_io_result(n);
}

#endif
