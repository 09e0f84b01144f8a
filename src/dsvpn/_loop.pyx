# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The data plane: one poll loop moving packets between the tun device and the TCP session.

Wire format and handshake: ../shared/protocol.md sections 4-7. Everything inside ``run()``
happens without the GIL, without Python objects and without allocation per packet; the loop
returns to Python only for events (see the EV_* constants and _loop.pyi).

Buffers (allocated once per Loop):
- tx: tun packets are read straight into ``txbuf`` at ``tx_end + 8`` (room for LEN||TAG),
  encrypted in place, and the whole batch goes out with one send(). ``tx_off`` tracks partial
  sends. The tun is read only while ``tx`` is empty, so when the socket is full the packets wait
  in the kernel's tun queue, not in our memory (backpressure), and there is never a memmove.
- rx: one large recv() into ``rxbuf``; frames are decrypted in place and written to the tun
  straight from the buffer; the trailing partial frame is moved to the front once per recv().
- vnet_hdr (Linux, tun_vnet.h): consecutive TCP segments decrypted from one recv() are written
  to the tun as one GSO packet, and TSO packets read from the tun are cut into ordinary packets
  before framing. The kernel then walks its stack once per ~64 KB instead of per packet, which
  halved the CPU the receiving side spends per byte. The wire is unchanged: one ordinary IP
  packet per frame.
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove, memset, strerror
from libc.stdio cimport snprintf
from libc.errno cimport errno, EINTR, ECONNRESET
from posix.unistd cimport close, read, write

from dsvpn.charm cimport charm_decrypt, charm_encrypt, charm_hash, charm_init, charm_state


cdef extern from "loop_sys.h" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    short POLLIN
    short POLLOUT
    short POLLERR
    short POLLHUP
    short POLLNVAL
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    int dsvpn_random(uint8_t* buf, size_t n)
    int64_t dsvpn_now_ms()
    int64_t dsvpn_wall_s()
    int dsvpn_set_nonblock(int fd)
    void dsvpn_set_cloexec(int fd)
    void dsvpn_tcp_opts(int fd)
    int dsvpn_accept(int lfd, uint8_t* key16, char* text, size_t textlen)
    int dsvpn_peer(int fd, uint8_t* key16, char* text, size_t textlen)
    ssize_t dsvpn_send(int fd, const void* buf, size_t n)
    int dsvpn_would_block(int err)


cdef extern from "tun_vnet.h" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t readv(int fd, const iovec* iov, int iovcnt)
    enum:
        DSVPN_VNET_HDR_LEN
    struct dsvpn_vnet_hdr:
        uint8_t flags
        uint8_t gso_type
    struct dsvpn_gro:
        int segs
        uint64_t writes, errors, merged
    void dsvpn_gro_add(int fd, dsvpn_gro* g, uint8_t* pkt, size_t len)
    void dsvpn_gro_flush(int fd, dsvpn_gro* g)
    int dsvpn_vnet_finish_csum(const dsvpn_vnet_hdr* h, uint8_t* pkt, size_t len)
    size_t dsvpn_gso_count(const dsvpn_vnet_hdr* h, const uint8_t* pkt, size_t len,
                           size_t frame_hdr, size_t* room)
    size_t dsvpn_gso_segment(const dsvpn_vnet_hdr* h, const uint8_t* src, size_t len,
                             size_t i, size_t nseg, uint8_t* out)


# Events returned by run()
EV_TIMEOUT = 0
EV_WAKE = 1
EV_SESSION_UP = 2
EV_SESSION_DOWN = 3
EV_LOG = 4
EV_HANDSHAKE_FAILED = 5
EV_TUN_ERROR = 6

cdef enum:
    C_EV_TIMEOUT = 0
    C_EV_WAKE = 1
    C_EV_SESSION_UP = 2
    C_EV_SESSION_DOWN = 3
    C_EV_LOG = 4
    C_EV_HANDSHAKE_FAILED = 5
    C_EV_TUN_ERROR = 6

# Protocol constants (protocol.md section 8)
cdef enum:
    TAG_LEN = 6
    HDR = 8                     # LEN (2, LE) || TAG (6)
    MAX_PAYLOAD = 65535         # LEN is a uint16; larger tun packets are refused
    TUN_READ_MAX = 65536        # one more than MAX_PAYLOAD so oversized packets are detectable
    TS_TOLERANCE = 7200
    TIMEOUT_MS = 60000          # client handshake, send progress
    ACCEPT_TIMEOUT_MS = 10000   # whole server-side handshake
    PKT1_LEN = 72
    PKT2_LEN = 64

# Budgets. A tx batch stops at TX_BATCH_BYTES or TX_BATCH_PKTS; TCP_NOTSENT_LOWAT (128 KiB)
# caps what one send() takes anyway, so larger batches would only sit in our buffer.
cdef enum:
    TX_BATCH_BYTES = 196608
    TX_BATCH_PKTS = 128
    # Slack after the batch limit: one 64 KiB TSO packet cut into segments of the smallest
    # MSS (88) with the largest headers (120) still fits (< 160 KiB; see _tun_gso).
    TX_CAP = TX_BATCH_BYTES + 262144
    RX_READ = 262144
    RX_CAP = RX_READ + HDR + MAX_PAYLOAD + 16
    QUICK_MAX = 512             # a lone tun packet up to this size is sent at once (_tun_batch)
    DISCARD_PKTS = 64           # tun packets discarded per iteration when there is no session
    ACCEPT_BUDGET = 16          # accept() calls per iteration
    MAX_PENDING = 8             # concurrent server-side handshakes; the oldest is dropped
    EVQ = 32
    MSG_LEN = 256
    IPTXT = 64

# BUFFERBLOAT_CONTROL (protocol.md section 7): when a send() of a fresh batch could take
# nothing at all (EAGAIN), the next tun packet read is discarded, as the reference does after
# a write that fails with EAGAIN. Partial sends do not set it (same as the reference). With
# batched sends and the tun not being read while our buffer is non-empty, this fires rarely;
# the main congestion signal is the kernel's tun queue filling up while we wait for POLLOUT.
cdef enum:
    BUFFERBLOAT_CONTROL = 1

cdef const char* KX_IV = b"VPN Key Exchange"
cdef const char* CLIENT_EOF_MSG = (
    b"the server closed the connection during the handshake: "
    b"wrong key, or the server is busy with another client")


cdef struct Pending:
    int fd
    int got
    int64_t deadline
    uint64_t seq
    charm_state st
    uint8_t buf[PKT1_LEN]
    uint8_t ip[16]
    char text[IPTXT]


cdef struct Event:
    int code
    char msg[MSG_LEN]


cdef inline int ct_eq(const uint8_t* a, const uint8_t* b, size_t n) noexcept nogil:
    cdef uint8_t d = 0
    cdef size_t i
    for i in range(n):
        d |= a[i] ^ b[i]
    return d == 0


def tcp_options(int fd):
    """Apply the protocol.md section 8 TCP options (plus TCP_NODELAY); errors are ignored."""
    with nogil:
        dsvpn_tcp_opts(fd)


cdef class Loop:
    cdef int tun_fd, wake_fd, listen_fd, is_server, tun_header, af_inet, af_inet6, mtu
    cdef bint vnet_hdr               # Linux IFF_VNET_HDR tun: see tun_vnet.h
    cdef dsvpn_gro gro
    cdef bint closed
    cdef charm_state kx
    # session
    cdef int sock
    cdef uint64_t gen               # bumped whenever the session socket changes
    cdef charm_state tx_st, rx_st
    cdef uint8_t peer_ip[16]
    cdef char peer_text[IPTXT]
    cdef uint8_t* txbuf
    cdef uint8_t* gsobuf            # vnet_hdr only: a TSO packet being cut into segments
    cdef size_t tx_off, tx_end
    cdef int64_t tx_since           # last send progress (or start of the wait)
    cdef bint congestion
    cdef uint8_t* rxbuf
    cdef size_t rx_len
    # client handshake in progress
    cdef int hs_fd
    cdef int hs_sent, hs_got
    cdef int64_t hs_deadline
    cdef charm_state hs_st
    cdef uint8_t hs_out[PKT1_LEN]
    cdef uint8_t hs_in[PKT2_LEN]
    # server handshakes in progress
    cdef Pending pend[MAX_PENDING]
    cdef uint64_t pend_seq
    # test hooks
    cdef uint8_t* trand
    cdef size_t trand_len, trand_pos
    cdef bint has_tclock
    cdef int64_t tclock
    cdef int64_t accept_timeout_ms, connect_timeout_ms, send_timeout_ms
    # counters
    cdef uint64_t n_tun_rx_packets, n_tun_rx_bytes, n_tun_tx_packets, n_tun_tx_errors
    cdef uint64_t n_sock_rx_bytes, n_sock_tx_bytes, n_frames_rx, n_frames_tx
    cdef uint64_t n_congestion_drops, n_no_session_drops, n_oversize_drops, n_short_drops
    cdef uint64_t n_handshakes_ok, n_handshakes_failed
    # events
    cdef Event evq[EVQ]
    cdef int ev_head, ev_count

    def __cinit__(self):
        self.sock = -1
        self.hs_fd = -1
        self.txbuf = <uint8_t*> malloc(TX_CAP)
        self.rxbuf = <uint8_t*> malloc(RX_CAP)
        if self.txbuf == NULL or self.rxbuf == NULL:
            raise MemoryError()
        cdef int i
        for i in range(MAX_PENDING):
            self.pend[i].fd = -1

    def __init__(self, int tun_fd, key, *, bint is_server, int wake_fd=-1, int listen_fd=-1,
                 bint tun_header=False, int af_inet=2, int af_inet6=10, int mtu=9000,
                 bint vnet_hdr=False):
        cdef const uint8_t[:] k = bytes(key)
        if k.shape[0] != 32:
            raise ValueError("the key must be exactly 32 bytes")
        self.tun_fd = tun_fd
        self.wake_fd = wake_fd
        self.listen_fd = listen_fd
        self.is_server = is_server
        self.tun_header = tun_header
        self.vnet_hdr = vnet_hdr
        if tun_header and vnet_hdr:
            raise ValueError("tun_header and vnet_hdr exclude each other")
        self.af_inet = af_inet
        self.af_inet6 = af_inet6
        self.mtu = mtu
        self.accept_timeout_ms = ACCEPT_TIMEOUT_MS
        self.connect_timeout_ms = TIMEOUT_MS
        self.send_timeout_ms = TIMEOUT_MS
        charm_init(&self.kx, &k[0], <const uint8_t*> KX_IV)
        if vnet_hdr:
            self.gsobuf = <uint8_t*> malloc(TUN_READ_MAX)
            if self.gsobuf == NULL:
                raise MemoryError()
        # The loop drains the tun until EAGAIN, so its reads must not block.
        if dsvpn_set_nonblock(tun_fd) != 0:
            raise OSError(errno, strerror(errno).decode())

    def __dealloc__(self):
        self._close_all()
        free(self.txbuf)
        free(self.rxbuf)
        free(self.gsobuf)
        free(self.trand)

    # ---------------------------------------------------------------- helpers (nogil)

    cdef void _push(self, int code, const char* msg) noexcept nogil:
        cdef int i
        if self.ev_count == EVQ:
            return  # only possible with a log flood; losing a log line is acceptable
        i = (self.ev_head + self.ev_count) % EVQ
        self.evq[i].code = code
        snprintf(self.evq[i].msg, MSG_LEN, "%s", msg)
        self.ev_count += 1

    cdef void _rand32(self, uint8_t* out) noexcept nogil:
        if self.trand != NULL and self.trand_pos + 32 <= self.trand_len:
            memcpy(out, self.trand + self.trand_pos, 32)
            self.trand_pos += 32
        elif dsvpn_random(out, 32) != 0:
            # No CSPRNG is fatal for the handshake: make it fail rather than use weak bytes.
            memset(out, 0, 32)

    cdef int64_t _wall(self) noexcept nogil:
        return self.tclock if self.has_tclock else dsvpn_wall_s()

    cdef void _drop_session(self) noexcept nogil:
        if self.sock >= 0:
            close(self.sock)
            self.sock = -1
        self.gen += 1
        memset(&self.tx_st, 0, sizeof(charm_state))
        memset(&self.rx_st, 0, sizeof(charm_state))
        self.tx_off = self.tx_end = 0
        self.rx_len = 0
        self.gro.segs = 0
        self.congestion = False

    cdef void _session_down(self, const char* why) noexcept nogil:
        self._drop_session()
        self._push(C_EV_SESSION_DOWN, why)

    cdef void _drop_client_hs(self) noexcept nogil:
        if self.hs_fd >= 0:
            close(self.hs_fd)
            self.hs_fd = -1
        memset(&self.hs_st, 0, sizeof(charm_state))

    cdef void _drop_pending(self, int i) noexcept nogil:
        if self.pend[i].fd >= 0:
            close(self.pend[i].fd)
            self.pend[i].fd = -1
        memset(&self.pend[i].st, 0, sizeof(charm_state))

    cdef void _close_all(self) noexcept nogil:
        cdef int i
        self._drop_session()
        self._drop_client_hs()
        for i in range(MAX_PENDING):
            self._drop_pending(i)

    cdef void _install(self, int fd, charm_state* st, const uint8_t* ip,
                       const char* text) noexcept nogil:
        """Derive k = hash("") on the handshake state and make fd the session."""
        cdef uint8_t k[32]
        cdef uint8_t iv[16]
        charm_hash(st, NULL, 0, k)
        self._drop_session()        # a same-IP reconnect replaces the old session
        memset(iv, 0, 16)
        iv[0] = 1 if self.is_server else 0
        charm_init(&self.tx_st, k, iv)
        iv[0] ^= 1
        charm_init(&self.rx_st, k, iv)
        memset(k, 0, 32)
        memset(st, 0, sizeof(charm_state))
        self.sock = fd
        memcpy(self.peer_ip, ip, 16)
        snprintf(self.peer_text, IPTXT, "%s", text)
        self.n_handshakes_ok += 1
        self._push(C_EV_SESSION_UP, self.peer_text)

    # ---------------------------------------------------------------- server side

    cdef void _accept(self, int64_t now) noexcept nogil:
        cdef int _n, fd, i, slot
        cdef uint8_t ip[16]
        cdef char text[IPTXT]
        cdef char msg[MSG_LEN]
        for _n in range(ACCEPT_BUDGET):
            fd = dsvpn_accept(self.listen_fd, ip, text, IPTXT)
            if fd < 0:
                return  # EAGAIN, or a transient error (ECONNABORTED, EMFILE): retried next poll
            if self.sock >= 0 and memcmp16(ip, self.peer_ip) != 0:
                close(fd)
                snprintf(msg, MSG_LEN,
                         "connection from %s refused: a session from %s is already active",
                         text, self.peer_text)
                self._push(C_EV_LOG, msg)
                continue
            dsvpn_tcp_opts(fd)
            slot = -1
            for i in range(MAX_PENDING):
                if self.pend[i].fd < 0:
                    slot = i
                    break
            if slot < 0:
                # Full: the oldest one goes, so a flood cannot exhaust our descriptors.
                slot = 0
                for i in range(1, MAX_PENDING):
                    if self.pend[i].seq < self.pend[slot].seq:
                        slot = i
                snprintf(msg, MSG_LEN,
                         "handshake from %s dropped: too many pending handshakes",
                         self.pend[slot].text)
                self._drop_pending(slot)
                self.n_handshakes_failed += 1
                self._push(C_EV_LOG, msg)
            self.pend_seq += 1
            self.pend[slot].fd = fd
            self.pend[slot].got = 0
            self.pend[slot].seq = self.pend_seq
            self.pend[slot].deadline = now + self.accept_timeout_ms
            self.pend[slot].st = self.kx
            memcpy(self.pend[slot].ip, ip, 16)
            snprintf(self.pend[slot].text, IPTXT, "%s", text)

    cdef void _pending_fail(self, int i, const char* fmt) noexcept nogil:
        cdef char msg[MSG_LEN]
        snprintf(msg, MSG_LEN, fmt, self.pend[i].text)
        self._drop_pending(i)
        self.n_handshakes_failed += 1
        self._push(C_EV_LOG, msg)

    cdef void _pending_io(self, int i) noexcept nogil:
        cdef Pending* p = &self.pend[i]
        cdef ssize_t n
        cdef uint8_t h[32]
        cdef uint8_t pkt2[PKT2_LEN]
        cdef uint64_t ts
        cdef int64_t now, diff
        cdef int j, fd
        cdef char msg[MSG_LEN]
        # Read exactly the 72 bytes of pkt1: anything after it belongs to the frame stream.
        n = read(p.fd, p.buf + p.got, PKT1_LEN - p.got)
        if n == 0:
            self._pending_fail(i, "handshake failed from %s: connection closed")
            return
        if n < 0:
            if errno == EINTR or dsvpn_would_block(errno):
                return
            snprintf(msg, MSG_LEN, "handshake failed from %%s: %s", strerror(errno))
            self._pending_fail(i, msg)
            return
        p.got += <int> n
        if p.got < PKT1_LEN:
            return
        charm_hash(&p.st, p.buf, 40, h)
        if not ct_eq(h, p.buf + 40, 32):
            self._pending_fail(i, "authentication failed from %s: wrong key or garbage")
            return
        ts = 0
        for j in range(8):
            ts |= (<uint64_t> p.buf[32 + j]) << (8 * j)
        now = self._wall()
        if ts > <uint64_t> 0x7fffffffffffffff:
            diff = TS_TOLERANCE + 1
        else:
            diff = <int64_t> ts - now
            if diff < 0:
                diff = -diff
        if diff > TS_TOLERANCE:
            self._pending_fail(i, "clock difference too large from %s")
            return
        if self.sock >= 0 and memcmp16(p.ip, self.peer_ip) != 0:
            # Another client's session came up while this one was shaking hands.
            snprintf(msg, MSG_LEN,
                     "connection from %%s refused: a session from %s is already active",
                     self.peer_text)
            self._pending_fail(i, msg)
            return
        self._rand32(pkt2)
        charm_hash(&p.st, pkt2, 32, pkt2 + 32)
        # One non-blocking write; a fresh socket always has room for 64 bytes.
        n = dsvpn_send(p.fd, pkt2, PKT2_LEN)
        if n != PKT2_LEN:
            self._pending_fail(i, "handshake failed from %s: could not send the reply")
            return
        fd = p.fd
        p.fd = -1
        self._install(fd, &p.st, p.ip, p.text)

    # ---------------------------------------------------------------- client side

    cdef void _client_fail(self, const char* why) noexcept nogil:
        self._drop_client_hs()
        self.n_handshakes_failed += 1
        self._push(C_EV_HANDSHAKE_FAILED, why)

    cdef void _client_io(self, short revents) noexcept nogil:
        cdef ssize_t n
        cdef uint8_t h[32]
        cdef uint8_t ip[16]
        cdef char text[IPTXT]
        cdef char msg[MSG_LEN]
        cdef int fd
        while self.hs_sent < PKT1_LEN:
            n = dsvpn_send(self.hs_fd, self.hs_out + self.hs_sent, PKT1_LEN - self.hs_sent)
            if n < 0:
                if errno == EINTR:
                    continue
                if dsvpn_would_block(errno):
                    return
                snprintf(msg, MSG_LEN, "write error: %s", strerror(errno))
                self._client_fail(msg)
                return
            self.hs_sent += <int> n
        if not (revents & (POLLIN | POLLHUP | POLLERR)):
            return
        # Exactly 64 bytes: frames may follow pkt2 immediately and belong to the session.
        n = read(self.hs_fd, self.hs_in + self.hs_got, PKT2_LEN - self.hs_got)
        # A server that refuses us closes without reading pkt1, which the kernel turns into a
        # reset rather than EOF: both mean the same thing to the user.
        if n == 0 or (n < 0 and errno == ECONNRESET):
            self._client_fail(CLIENT_EOF_MSG)
            return
        if n < 0:
            if errno == EINTR or dsvpn_would_block(errno):
                return
            snprintf(msg, MSG_LEN, "read error: %s", strerror(errno))
            self._client_fail(msg)
            return
        self.hs_got += <int> n
        if self.hs_got < PKT2_LEN:
            return
        charm_hash(&self.hs_st, self.hs_in, 32, h)
        if not ct_eq(h, self.hs_in + 32, 32):
            self._client_fail(b"the server's reply failed authentication: wrong key?")
            return
        fd = self.hs_fd
        self.hs_fd = -1
        dsvpn_peer(fd, ip, text, IPTXT)
        self._install(fd, &self.hs_st, ip, text)

    # ---------------------------------------------------------------- data plane

    cdef void _flush(self, int64_t now) noexcept nogil:
        cdef ssize_t n
        cdef char msg[MSG_LEN]
        while self.tx_off < self.tx_end:
            n = dsvpn_send(self.sock, self.txbuf + self.tx_off, self.tx_end - self.tx_off)
            if n > 0:
                self.tx_off += <size_t> n
                self.n_sock_tx_bytes += <uint64_t> n
                self.tx_since = now
                if self.tx_off < self.tx_end:
                    return      # socket full: wait for POLLOUT
                self.tx_off = self.tx_end = 0
                return
            if n < 0 and errno == EINTR:
                continue
            if n < 0 and dsvpn_would_block(errno):
                if BUFFERBLOAT_CONTROL:
                    self.congestion = True
                return
            snprintf(msg, MSG_LEN, "write error: %s", strerror(errno if n < 0 else 0))
            self._session_down(msg)
            return

    cdef int _tun_error(self, ssize_t n) noexcept nogil:
        """Handle a tun read result <= 0. Returns 1 to stop reading (EAGAIN or fatal)."""
        cdef char msg[MSG_LEN]
        if n < 0 and errno == EINTR:
            return 0
        if n < 0 and dsvpn_would_block(errno):
            return 1
        if n == 0:
            snprintf(msg, MSG_LEN, "end of file on the tun device")
        else:
            snprintf(msg, MSG_LEN, "%s", strerror(errno))
        self._push(C_EV_TUN_ERROR, msg)
        return 1

    cdef void _tun_discard(self) noexcept nogil:
        cdef int _i
        cdef ssize_t n
        for _i in range(DISCARD_PKTS):
            # (with a vnet header, the header simply lands at the start of the buffer)
            n = read(self.tun_fd, self.txbuf, TUN_READ_MAX + 4 + DSVPN_VNET_HDR_LEN)
            if n <= 0:
                if self._tun_error(n):
                    return
                continue
            self.n_tun_rx_packets += 1
            self.n_tun_rx_bytes += <uint64_t> n
            self.n_no_session_drops += 1

    cdef void _emit(self, uint8_t* p, size_t plen) noexcept nogil:
        """Turn the tun packet at p + 8 (p = txbuf + tx_end) into a frame and append it."""
        cdef uint8_t tag[16]
        if self.congestion:
            # The reference's congestion signal: drop one packet, state not advanced.
            self.congestion = False
            self.n_congestion_drops += 1
            return
        if plen > MAX_PAYLOAD or plen == 0:
            self.n_oversize_drops += 1
            return
        charm_encrypt(&self.tx_st, p + HDR, plen, tag)
        p[0] = <uint8_t> (plen & 0xff)
        p[1] = <uint8_t> (plen >> 8)
        memcpy(p + 2, tag, TAG_LEN)
        self.tx_end += HDR + plen
        self.n_frames_tx += 1

    cdef void _tun_gso(self, const dsvpn_vnet_hdr* vh, uint8_t* src, size_t plen) noexcept nogil:
        """A TSO super-packet read to src (= txbuf + tx_end + 8): cut it into ordinary packets,
        one frame each (tun_vnet.h). The segments grow (headers repeat), so src is moved out
        to gsobuf first."""
        cdef size_t room = 0, i
        cdef size_t nseg = dsvpn_gso_count(vh, src, plen, HDR, &room)
        cdef uint8_t* p
        if nseg == 0 or self.tx_end + room > TX_CAP:
            self.n_oversize_drops += 1
            return
        memcpy(self.gsobuf, src, plen)
        self.n_tun_rx_packets += nseg - 1
        for i in range(nseg):
            p = self.txbuf + self.tx_end
            self._emit(p, dsvpn_gso_segment(vh, self.gsobuf, plen, i, nseg, p + HDR))

    cdef void _tun_batch(self, int64_t now) noexcept nogil:
        """Read ready tun packets into txbuf, encrypt them in place, send the batch at once."""
        cdef int count = 0
        cdef ssize_t n
        cdef size_t plen
        cdef uint8_t* p
        cdef size_t hoff = 4 if self.tun_header else 0
        cdef dsvpn_vnet_hdr vh
        cdef iovec iov[2]
        while count < TX_BATCH_PKTS and self.tx_end < TX_BATCH_BYTES:
            p = self.txbuf + self.tx_end
            # Payload lands at p + 8; with an AF header the header lands at p + 4..p + 8,
            # where LEN||TAG will overwrite it. A 10-byte vnet header does not fit there
            # (it would hit the previous frame), so it goes to its own iovec.
            if self.vnet_hdr:
                iov[0].iov_base = &vh
                iov[0].iov_len = DSVPN_VNET_HDR_LEN
                iov[1].iov_base = p + HDR
                iov[1].iov_len = TUN_READ_MAX
                n = readv(self.tun_fd, iov, 2)
                hoff = DSVPN_VNET_HDR_LEN  # counted in n, not in the buffer
            else:
                n = read(self.tun_fd, p + HDR - hoff, TUN_READ_MAX + hoff)
            if n <= 0:
                if self._tun_error(n):
                    break
                continue
            count += 1
            self.n_tun_rx_packets += 1
            if <size_t> n < hoff:
                self.n_short_drops += 1
                continue
            plen = <size_t> n - hoff
            self.n_tun_rx_bytes += plen
            if self.vnet_hdr and vh.gso_type != 0:
                self._tun_gso(&vh, p + HDR, plen)
                continue
            if self.vnet_hdr and (vh.flags & 1) and \
                    dsvpn_vnet_finish_csum(&vh, p + HDR, plen) != 0:
                self.n_oversize_drops += 1
                continue
            self._emit(p, plen)
            if count == 1 and plen <= QUICK_MAX and self.tx_end > 0 \
                    and not _bulk_ack(p + HDR, plen):
                # Latency: a lone small packet (ping, DNS, a keystroke, a request) goes out now,
                # not after the read that would only confirm the tun is empty. Pure ACKs and
                # TSO packets still wait for the batch, so bulk transfers keep one send().
                self.tx_since = now
                self._flush(now)
                if self.sock < 0 or self.tx_end != 0:
                    return      # session gone, or socket full: backpressure as below
        if self.tx_end > self.tx_off:
            if self.tx_off == 0 and self.tx_since < now:
                self.tx_since = now
            self._flush(now)

    cdef void _tun_write(self, uint8_t* frame, size_t plen) noexcept nogil:
        """Write the plaintext at frame + 8 to the tun; frame[0..8] is free scratch space."""
        cdef ssize_t n
        cdef uint8_t* out = frame + HDR
        cdef size_t olen = plen
        cdef uint32_t af
        cdef int v
        if self.vnet_hdr:
            dsvpn_gro_add(self.tun_fd, &self.gro, out, olen)
            self.n_tun_tx_packets += 1
            return
        if self.tun_header:
            if plen < 20:
                self.n_short_drops += 1
                return
            v = out[0] >> 4
            if v == 4:
                af = <uint32_t> self.af_inet
            elif v == 6:
                af = <uint32_t> self.af_inet6
            else:
                self.n_tun_tx_errors += 1
                return
            out = frame + 4
            out[0] = <uint8_t> (af >> 24)
            out[1] = <uint8_t> (af >> 16)
            out[2] = <uint8_t> (af >> 8)
            out[3] = <uint8_t> af
            olen = plen + 4
        while True:
            n = write(self.tun_fd, out, olen)
            if n < 0 and errno == EINTR:
                continue
            break
        if n < 0:
            self.n_tun_tx_errors += 1
        else:
            self.n_tun_tx_packets += 1

    cdef void _sock_read(self) noexcept nogil:
        cdef ssize_t n
        cdef size_t pos = 0, plen
        cdef uint8_t* p
        cdef uint8_t tag[TAG_LEN]
        cdef char msg[MSG_LEN]
        n = read(self.sock, self.rxbuf + self.rx_len, RX_CAP - self.rx_len)
        if n == 0:
            self._session_down(b"connection closed by peer")
            return
        if n < 0:
            if errno == EINTR or dsvpn_would_block(errno):
                return
            snprintf(msg, MSG_LEN, "read error: %s", strerror(errno))
            self._session_down(msg)
            return
        self.n_sock_rx_bytes += <uint64_t> n
        self.rx_len += <size_t> n
        while self.rx_len - pos >= HDR:
            p = self.rxbuf + pos
            plen = <size_t> p[0] | (<size_t> p[1] << 8)
            if self.rx_len - pos < HDR + plen:
                break
            memcpy(tag, p + 2, TAG_LEN)
            if charm_decrypt(&self.rx_st, p + HDR, plen, tag, TAG_LEN) != 0:
                # Frames before this one were already written to the tun, as in the reference.
                dsvpn_gro_flush(self.tun_fd, &self.gro)
                self._session_down(b"corrupted stream")
                return
            self.n_frames_rx += 1
            if plen > 0:
                self._tun_write(p, plen)
            pos += HDR + plen
        # Merged packets point into rxbuf: write them before it is compacted.
        dsvpn_gro_flush(self.tun_fd, &self.gro)
        if pos > 0:
            if pos < self.rx_len:
                memmove(self.rxbuf, self.rxbuf + pos, self.rx_len - pos)
            self.rx_len -= pos

    # ---------------------------------------------------------------- the loop

    cdef void _deadlines(self, int64_t now) noexcept nogil:
        cdef int i
        for i in range(MAX_PENDING):
            if self.pend[i].fd >= 0 and now >= self.pend[i].deadline:
                self._pending_fail(i, "handshake timeout from %s")
        if self.hs_fd >= 0 and now >= self.hs_deadline:
            self._client_fail(b"handshake timed out")
        if (self.sock >= 0 and self.tx_end > self.tx_off
                and now - self.tx_since >= self.send_timeout_ms):
            self._session_down(b"send timeout")

    cdef int64_t _next_deadline(self, int64_t limit) noexcept nogil:
        cdef int i
        for i in range(MAX_PENDING):
            if self.pend[i].fd >= 0 and self.pend[i].deadline < limit:
                limit = self.pend[i].deadline
        if self.hs_fd >= 0 and self.hs_deadline < limit:
            limit = self.hs_deadline
        if (self.sock >= 0 and self.tx_end > self.tx_off
                and self.tx_since + self.send_timeout_ms < limit):
            limit = self.tx_since + self.send_timeout_ms
        return limit

    cdef void _run(self, int64_t timeout_ms) noexcept nogil:
        cdef pollfd fds[6 + MAX_PENDING]
        cdef int pidx[MAX_PENDING]
        cdef uint64_t pseq[MAX_PENDING]
        cdef int nfds, i, r, i_wake, i_listen, i_tun, i_sock, i_hs, wait
        cdef uint64_t gen, wrote
        cdef int64_t now, end, nxt
        cdef uint8_t drain[256]
        cdef short rev
        now = dsvpn_now_ms()
        end = now + timeout_ms if timeout_ms >= 0 else -1
        while True:
            self._deadlines(now)
            if self.ev_count:
                return
            nfds = 0
            i_wake = i_listen = i_tun = i_sock = i_hs = -1
            if self.wake_fd >= 0:
                i_wake = nfds
                fds[nfds].fd = self.wake_fd
                fds[nfds].events = POLLIN
                nfds += 1
            if self.sock >= 0:
                i_sock = nfds
                fds[nfds].fd = self.sock
                fds[nfds].events = POLLIN
                if self.tx_end > self.tx_off:
                    fds[nfds].events |= POLLOUT
                nfds += 1
            # Backpressure: with a session, read the tun only once our buffer is empty.
            if self.sock < 0 or self.tx_end == self.tx_off:
                i_tun = nfds
                fds[nfds].fd = self.tun_fd
                fds[nfds].events = POLLIN
                nfds += 1
            if self.hs_fd >= 0:
                i_hs = nfds
                fds[nfds].fd = self.hs_fd
                fds[nfds].events = POLLIN
                if self.hs_sent < PKT1_LEN:
                    fds[nfds].events |= POLLOUT
                nfds += 1
            for i in range(MAX_PENDING):
                pidx[i] = -1
                if self.pend[i].fd >= 0:
                    pidx[i] = nfds
                    pseq[i] = self.pend[i].seq
                    fds[nfds].fd = self.pend[i].fd
                    fds[nfds].events = POLLIN
                    nfds += 1
            if self.listen_fd >= 0 and self.is_server:
                i_listen = nfds
                fds[nfds].fd = self.listen_fd
                fds[nfds].events = POLLIN
                nfds += 1
            nxt = self._next_deadline(end if end >= 0 else now + 3600000)
            wait = <int> (nxt - now) if nxt > now else 0
            gen = self.gen
            r = poll(fds, <unsigned long> nfds, wait)
            now = dsvpn_now_ms()
            if r < 0:
                if errno == EINTR and self.wake_fd < 0:
                    # Nobody else will tell Python about the signal.
                    self._push(C_EV_WAKE, b"")
                    return
            elif r > 0:
                if i_wake >= 0 and fds[i_wake].revents:
                    while read(self.wake_fd, drain, 256) > 0:
                        pass
                    self._push(C_EV_WAKE, b"")
                wrote = self.n_tun_tx_packets
                if i_sock >= 0 and fds[i_sock].revents and gen == self.gen:
                    rev = fds[i_sock].revents
                    if rev & (POLLIN | POLLHUP | POLLERR):
                        self._sock_read()
                    if gen == self.gen and (rev & POLLOUT) and self.tx_end > self.tx_off:
                        self._flush(now)
                # Writing to the tun usually makes the answer (a forwarded reply, the local
                # stack's ACK) ready at once, in the same call: read it now, not after one more
                # poll() round.
                if i_tun >= 0 and (fds[i_tun].revents or (
                        self.n_tun_tx_packets != wrote and self.sock >= 0)):
                    if self.sock < 0:
                        self._tun_discard()
                    elif self.tx_end == self.tx_off:
                        self._tun_batch(now)
                if i_hs >= 0 and fds[i_hs].revents and self.hs_fd == fds[i_hs].fd:
                    self._client_io(fds[i_hs].revents)
                for i in range(MAX_PENDING):
                    # seq check: the slot may have been dropped or reused in this iteration
                    if pidx[i] >= 0 and self.pend[i].fd >= 0 and self.pend[i].seq == pseq[i] \
                            and fds[pidx[i]].revents:
                        self._pending_io(i)
                if i_listen >= 0 and fds[i_listen].revents:
                    self._accept(now)
            if self.ev_count:
                return
            if end >= 0 and now >= end:
                return

    # ---------------------------------------------------------------- Python API

    def connect(self, int fd):
        """Client: start the handshake on a connected TCP socket; the loop owns fd from now
        on (pass sock.detach()), also when this raises."""
        cdef int own = fd
        if self.closed or self.is_server:
            close(own)
            if self.closed:
                raise RuntimeError("loop is closed")
            raise ValueError("connect() is for client loops")
        dsvpn_set_cloexec(own)
        if dsvpn_set_nonblock(own) != 0:
            close(own)
            raise OSError(errno, strerror(errno).decode())
        cdef uint64_t ts
        cdef int j
        with nogil:
            self._drop_session()
            self._drop_client_hs()
            self.hs_fd = own
            self.hs_sent = self.hs_got = 0
            self.hs_deadline = dsvpn_now_ms() + self.connect_timeout_ms
            self.hs_st = self.kx
            self._rand32(self.hs_out)
            ts = <uint64_t> self._wall()
            for j in range(8):
                self.hs_out[32 + j] = <uint8_t> (ts >> (8 * j))
            charm_hash(&self.hs_st, self.hs_out, 40, self.hs_out + 40)
            self._client_io(0)

    def run(self, int timeout_ms):
        """Run until the first event or timeout_ms (negative: no timeout); see _loop.pyi."""
        if self.closed:
            raise RuntimeError("loop is closed")
        if self.ev_count == 0:
            with nogil:
                self._run(timeout_ms)
        if self.ev_count == 0:
            return (EV_TIMEOUT, "")
        cdef Event* e = &self.evq[self.ev_head]
        self.ev_head = (self.ev_head + 1) % EVQ
        self.ev_count -= 1
        return (e.code, e.msg.decode("utf-8", "replace"))

    def disconnect(self):
        """Drop the session and every handshake in progress (no event)."""
        self._close_all()

    def close(self):
        """Close every socket the loop owns. The loop cannot be used afterwards."""
        self._close_all()
        self.closed = True

    @property
    def session_active(self):
        return self.sock >= 0

    @property
    def peer(self):
        return self.peer_text.decode() if self.sock >= 0 else None

    def stats(self):
        return {
            "tun_rx_packets": self.n_tun_rx_packets,
            "tun_rx_bytes": self.n_tun_rx_bytes,
            "tun_tx_packets": self.n_tun_tx_packets,
            "tun_tx_errors": self.n_tun_tx_errors + self.gro.errors,
            "tun_writes": self.gro.writes if self.vnet_hdr else self.n_tun_tx_packets,
            "tun_merged": self.gro.merged,
            "sock_rx_bytes": self.n_sock_rx_bytes,
            "sock_tx_bytes": self.n_sock_tx_bytes,
            "frames_rx": self.n_frames_rx,
            "frames_tx": self.n_frames_tx,
            "congestion_drops": self.n_congestion_drops,
            "no_session_drops": self.n_no_session_drops,
            "oversize_drops": self.n_oversize_drops,
            "short_drops": self.n_short_drops,
            "handshakes_ok": self.n_handshakes_ok,
            "handshakes_failed": self.n_handshakes_failed,
            "pending_handshakes": sum(1 for i in range(MAX_PENDING) if self.pend[i].fd >= 0),
            "rx_buffered": self.rx_len,
            "tx_queued": self.tx_end - self.tx_off,
        }

    def _set_test_random(self, data):
        """Test hook: the next handshakes take their 32 random bytes from data."""
        free(self.trand)
        self.trand = NULL
        self.trand_len = self.trand_pos = 0
        if data is None:
            return
        cdef const uint8_t[:] d = bytes(data)
        if d.shape[0] == 0:
            return
        self.trand = <uint8_t*> malloc(d.shape[0])
        if self.trand == NULL:
            raise MemoryError()
        memcpy(self.trand, &d[0], d.shape[0])
        self.trand_len = d.shape[0]

    def _set_test_clock(self, t):
        """Test hook: fixed wall-clock seconds for the handshake timestamp and its check."""
        self.has_tclock = t is not None
        self.tclock = 0 if t is None else t

    def _set_test_timeouts(self, accept_ms=None, connect_ms=None, send_ms=None):
        """Test hook: shorten the 10 s / 60 s / 60 s deadlines (None restores the default)."""
        self.accept_timeout_ms = ACCEPT_TIMEOUT_MS if accept_ms is None else accept_ms
        self.connect_timeout_ms = TIMEOUT_MS if connect_ms is None else connect_ms
        self.send_timeout_ms = TIMEOUT_MS if send_ms is None else send_ms


cdef inline bint _bulk_ack(const uint8_t* p, size_t n) noexcept nogil:
    """A TCP segment without payload with only ACK set (or ACK|PSH): the reverse stream of
    a bulk transfer, fine to batch. Anything else (SYN, FIN, RST, payload, non-TCP) is not."""
    cdef size_t ipl
    if n >= 40 and (p[0] >> 4) == 4 and p[9] == 6:
        ipl = (p[0] & 15) * 4
    elif n >= 60 and (p[0] >> 4) == 6 and p[6] == 6:
        ipl = 40
    else:
        return False
    if ipl + 20 > n:
        return False
    return ipl + (p[ipl + 12] >> 4) * 4 == n and (p[ipl + 13] & 0xf7) == 0x10


cdef inline int memcmp16(const uint8_t* a, const uint8_t* b) noexcept nogil:
    cdef int i
    for i in range(16):
        if a[i] != b[i]:
            return 1
    return 0
