# Declarations of loop_sys.h: the platform shims of the event loop (poll, random bytes, clocks,
# TCP options, peer addresses and non-blocking I/O retried on EINTR).
from libc.stdint cimport int64_t, uint8_t


cdef extern from "loop_sys.h" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    short POLLIN
    short POLLOUT
    short POLLERR
    short POLLHUP
    int poll(pollfd* fds, unsigned long nfds, int timeout)

    struct iovec:
        void* iov_base
        size_t iov_len

    enum:
        DSVPN_IP_TEXT
        DSVPN_ENDPOINT_TEXT
        DSVPN_IO_AGAIN
    struct dsvpn_addr:
        uint8_t key[16]
        char ip[DSVPN_IP_TEXT]
        char endpoint[DSVPN_ENDPOINT_TEXT]

    int dsvpn_random(uint8_t* buf, size_t n)
    int64_t dsvpn_now_ms()
    int64_t dsvpn_wall_s()
    int dsvpn_set_nonblock(int fd)
    void dsvpn_set_cloexec(int fd)
    int dsvpn_tcp_opts(int fd, int mark, unsigned int user_timeout_ms, int notsent_lowat)
    int64_t dsvpn_tcp_min_rtt_us(int fd)
    int dsvpn_set_rcvbuf(int fd, int bytes)
    ssize_t dsvpn_unread(int fd)
    int dsvpn_accept(int lfd, dsvpn_addr* peer)
    int dsvpn_peer(int fd, dsvpn_addr* peer)
    ssize_t dsvpn_read(int fd, void* buf, size_t n)
    void dsvpn_drain(int fd)
    ssize_t dsvpn_readv(int fd, const iovec* iov, int iovcnt)
    ssize_t dsvpn_write(int fd, const void* buf, size_t n)
    ssize_t dsvpn_send(int fd, const void* buf, size_t n)
