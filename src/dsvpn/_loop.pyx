# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The data plane: one poll loop moving packets between the tun device and the TCP session.

Wire format and handshake: docs/protocol.md, Handshake and Framing. Everything inside ``run()``
happens without the GIL, without Python objects and without allocation per packet; the loop
returns to Python only for events (the Event enum of _loop.pxd; _loop.pyi says what each carries).

Buffers (allocated once per Loop):
- fq (flowq.h): the tun is drained into per-flow queues as soon as it has packets, so that a
  bulk flow's backlog waits there, in its own queue, and not in the kernel's tun FIFO in front
  of everything else; packets leave in deficit round robin, new (sparse) flows first. At
  FQ_LIMIT bytes the tun is no longer read, and the kernel's backpressure takes over.
- tx: when the socket can take more (POLLOUT), a batch is taken from fq into ``txbuf`` at
  ``tx_end + 8`` (room for LEN||TAG), encrypted in place, and goes out with one send().
  ``tx_off`` tracks partial sends; fq is not read again until the batch is out, so what waits
  in FIFO order (our batch and the socket's unsent bytes, TCP_NOTSENT_LOWAT) stays small.
- rx: one large recv() into ``rxbuf``; frames are decrypted in place and written to the tun
  straight from the buffer; the trailing partial frame is moved to the front once per recv().
- vnet_hdr (Linux, tun_vnet.h): consecutive TCP segments decrypted from one recv() are written
  to the tun as one GSO packet, and TSO packets read from the tun are cut into ordinary packets
  before framing, so the kernel walks its stack once per ~64 KB instead of once per packet. The
  wire is unchanged: one ordinary IP packet per frame.

What happens to a frame from the peer (``_frames``, ``_admit``):
- a bad tag ends the session, as in the reference: the receiving duplex state has absorbed the
  forged plaintext and can never match the sender's again;
- an empty frame (LEN 0) is accepted and writes nothing, as in the reference, which lets it
  serve as a keepalive; its tag is checked and it advances the state like any other frame;
- a payload larger than the MTU is dropped (it could not have left the peer's tun);
- with ``client_ip4`` (a server), a payload that is not an IPv4/IPv6 packet, or whose source is
  not the client's tunnel address (IPv4, or the IPv6 twin), is dropped, so that a client can
  only ever send as itself; an IPv6 packet for the client's own link (a router solicitation
  from fe80::/10, say) is dropped too, but not counted as spoofed (admit.pxd).
Every drop is counted by reason (the Drop enum of _loop.pxd).

Server handshakes (docs/protocol.md, Handshake and Extensions): a pending connection's first 72
bytes are checked as a classic hello; if they do not verify, 32 more are read (same deadline) and
checked as the forward-secret hello on a copy of the PFS_IV state. A verified extended hello is
handed to Python (EV_PFS_HELLO, take_pfs_hello()), which does the X25519 part and gives the
reply and the session key back (pfs_reply()). A completed handshake from the address of the
live session does not replace it at once: the new connection is on probation until its first
frame authenticates (or the live session ends), so a replayed hello cannot end a session; one
whose first frame has not authenticated within the handshake deadline (ACCEPT_TIMEOUT_MS) is
closed.
"""

cimport cython
from libc.errno cimport ECONNRESET, EINTR, errno
from libc.stddef cimport ptrdiff_t
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset, strerror
from posix.unistd cimport close

from dsvpn.admit cimport admit_source
from dsvpn.charm cimport (
    CHARM_HASH_LEN,
    CHARM_IV_LEN,
    CHARM_KEY_LEN,
    charm_hash,
    charm_init,
    charm_state,
)
from dsvpn.counters cimport N_DROPS, Counters, Traffic, loop_stats
from dsvpn.events cimport MSG_LEN, Events, events_next, events_push
from dsvpn.flowq cimport (
    DSVPN_FQ_HDR_MAX,
    dsvpn_fq,
    dsvpn_fq_commit,
    dsvpn_fq_dequeue,
    dsvpn_fq_destroy,
    dsvpn_fq_init,
    dsvpn_fq_release,
    dsvpn_fq_reset,
    dsvpn_fq_room,
    dsvpn_fq_slot,
)
from dsvpn.frame cimport frame_len, frame_open, frame_seal, rx_consume
from dsvpn.hello cimport (TestRandom, check_reply, hello_ts, hello_verifies, set_test_random,
                          take_random, ts_in_window)
from dsvpn.loop_sys cimport (
    DSVPN_ENDPOINT_TEXT,
    DSVPN_IO_AGAIN,
    DSVPN_IP_TEXT,
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLOUT,
    dsvpn_accept,
    dsvpn_addr,
    dsvpn_drain,
    dsvpn_now_ms,
    dsvpn_peer,
    dsvpn_random,
    dsvpn_read,
    dsvpn_send,
    dsvpn_set_cloexec,
    dsvpn_set_nonblock,
    dsvpn_tcp_opts,
    dsvpn_wall_s,
    poll,
    pollfd,
)
from dsvpn.loop_text cimport (BAD_HELLO_FMT, HS_FAILED_FMT, KX_IV, NO_RANDOM, PFS_IV,
                              PROB_TIMEOUT_MSG, TOO_MANY_FMT)
from dsvpn.pending cimport (PEND_BASE, PEND_EXTENDED, PEND_READY, Pending, lost_fmt, pending_count,
                            pending_read, pending_ready, pending_slot, pending_start, pending_taken,
                            take_hello, unmatched)
from dsvpn.rxbudget cimport RXW_QUEUE_US, RxBudget, rx_budget_due, rx_budget_set
from dsvpn.sendq cimport QUICK_MAX, TX_CAP, Framer, bulk_ack, send_batch
from dsvpn.tun_io cimport (
    AF_HDR_LEN,
    TUN_READ_MAX,
    TUN_SHORT,
    Tun,
    tun_error,
    tun_hdr_len,
    tun_read,
    tun_setup,
    tun_write,
)
from dsvpn.tun_vnet cimport DSVPN_VNET_HDR_LEN, dsvpn_gro_flush
from dsvpn.wire cimport *  # the protocol's sizes (docs/protocol.md)

# The events as module attributes too (EV_SESSION_UP, ...), straight from the one enum.
globals().update(Event.__members__)

# Budgets (a batch's are in sendq.pxd; TCP_NOTSENT_LOWAT caps what one send() takes anyway).
cdef enum:
    TUN_FILL_PKTS = 128         # tun reads per iteration
    FQ_RING = 4194304           # flow queue storage
    FQ_PKTS = 4096              # and the most packets it holds
    FQ_LIMIT = 2097152          # queued bytes at which the tun is no longer read
    RX_READ = 65536             # one recv(): decrypted and written before anything else runs
    RX_CAP = RX_READ + FRAME_HDR_LEN + MAX_PAYLOAD + 16
    DISCARD_PKTS = 64           # tun packets discarded per iteration when there is no session
    ACCEPT_BUDGET = 16          # accept() calls per iteration
    MAX_PENDING = 8             # concurrent server-side handshakes; the oldest is dropped
    # wake, control, session, tun, client handshake, listener, probation, pending handshakes
    POLL_MAX = 7 + MAX_PENDING
    PROB_CAP = FRAME_HDR_LEN + MAX_PAYLOAD  # a connection on probation: its first frame
    EVQ = 32                    # events queued at most (events.pxd)

# BUFFERBLOAT_CONTROL (docs/protocol.md, Congestion drop): when a send() of a fresh batch could take
# nothing at all (EAGAIN), the next tun packet read is discarded, as the reference does after
# a write that fails with EAGAIN. Partial sends do not set it (same as the reference). Batches
# are sent only once poll() reports room (a lone small packet excepted), so this fires rarely;
# the main congestion signal is the kernel's tun queue filling up once the flow queue is full.
cdef enum:
    BUFFERBLOAT_CONTROL = 1

cdef const char* CLIENT_EOF_MSG = (
    b"the server closed the connection during the handshake: "
    b"wrong key, or the server is busy with another client")
cdef const char* REFUSED_FMT = b"connection from %s refused: a session from %s is already active"
cdef const char* CLOCK_FMT = b"clock difference too large from %s: %s"
cdef const char* CLASSIC_REFUSED_FMT = b"classic handshake from %s refused (--require-pfs)"

# stats() and session() name each drop counter after its Drop member.
_DROP_NAMES = {int(d): d.name.removeprefix("DROP_").lower() for d in Drop}
if len(_DROP_NAMES) != N_DROPS:
    raise ImportError("counters.pxd: N_DROPS is not the number of Drop members")


cdef struct SessionRec:
    int64_t since, latest_handshake, ended  # wall-clock Unix seconds; ended is 0 while active
    bint pfs                    # keyed by the forward-secret handshake
    Traffic base        # active: the counters when it began; ended: its totals
    char endpoint[DSVPN_ENDPOINT_TEXT]
    char reason[MSG_LEN]


cdef struct PollSet:
    pollfd fds[POLL_MAX]
    unsigned long n
    # index into fds of each descriptor, -1 when it is not polled
    int wake, control, sock, tun, hs, listen, prob
    int pend[MAX_PENDING]
    uint64_t pseq[MAX_PENDING]


cdef inline int poll_add(PollSet* ps, int fd, short events) noexcept nogil:
    cdef int i = <int> ps.n
    ps.fds[i].fd = fd
    ps.fds[i].events = events
    ps.fds[i].revents = 0
    ps.n += 1
    return i


cdef inline short revents(const PollSet* ps, int i) noexcept nogil:
    return ps.fds[i].revents if i >= 0 else 0


cdef inline Traffic traffic_since(const Traffic* now, const Traffic* base) noexcept nogil:
    cdef Traffic d
    cdef int i
    d.rx_bytes = now.rx_bytes - base.rx_bytes
    d.tx_bytes = now.tx_bytes - base.tx_bytes
    d.rx_packets = now.rx_packets - base.rx_packets
    d.tx_packets = now.tx_packets - base.tx_packets
    for i in range(N_DROPS):
        d.drops[i] = now.drops[i] - base.drops[i]
    return d


def tcp_options(int fd, int mark=0):
    """Apply the TCP options of docs/protocol.md, TCP options (plus TCP_NODELAY); see _loop.pyi."""
    cdef int r, err = 0
    with nogil:
        r = dsvpn_tcp_opts(fd, mark, TIMEOUT_MS, NOTSENT_LOWAT)
        if r != 0:
            err = errno
    if r != 0:
        raise OSError(err, f"cannot set SO_MARK {mark}: {strerror(err).decode()}")


@cython.final
cdef class Loop:
    cdef Tun tun                    # the tun, its header and counters (tun_io.pxd)
    cdef int wake_fd, control_fd, listen_fd, is_server
    cdef int mark                   # SO_MARK of accepted sockets (0: none)
    cdef size_t mtu
    cdef bint closed
    cdef charm_state kx
    cdef charm_state pkx            # the forward-secret handshake's state (PFS_IV)
    cdef bint require_pfs           # server: refuse classic handshakes
    # source check (server): the client's tunnel addresses
    cdef bint check_src
    cdef uint8_t src4[4]
    cdef uint8_t src6[16]
    # session
    cdef int sock
    cdef uint64_t gen               # bumped whenever the session socket changes
    cdef charm_state tx_st, rx_st
    cdef dsvpn_addr peer_addr
    cdef dsvpn_fq fq                # tun packets waiting to be framed (flowq.h)
    cdef uint8_t* txbuf
    cdef size_t tx_off, tx_end
    cdef int64_t tx_since           # last send progress (or start of the wait)
    cdef RxBudget rxw               # the session's receive buffer (rxbudget.pxd)
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
    # server: a new connection from the live session's address, on probation (module docstring)
    cdef int prob_fd
    cdef bint prob_pfs
    cdef int64_t prob_hs            # wall-clock time of its handshake
    cdef int64_t prob_deadline      # its first frame must authenticate by then (monotonic ms)
    cdef charm_state prob_tx, prob_rx
    cdef dsvpn_addr prob_addr
    cdef uint8_t* prob_buf          # its first frame, until that has authenticated
    cdef size_t prob_len
    # test hooks
    cdef TestRandom trand
    cdef bint has_tclock
    cdef int64_t tclock
    cdef int64_t accept_timeout_ms, connect_timeout_ms, send_timeout_ms
    # counters: global, the active session's and the last ended one's
    cdef Counters c
    cdef SessionRec cur, last
    cdef bint has_last
    cdef uint64_t gap_base          # c.t.drops[<int> DROP_NO_SESSION] when the last session ended
    # events
    cdef Events ev

    def __cinit__(self):
        self.ev.cap = EVQ
        self.sock = -1
        self.hs_fd = -1
        self.prob_fd = -1
        cdef uint32_t seed = 0
        dsvpn_random(<uint8_t*> &seed, sizeof(seed))  # flow hashing only: any value works
        self.txbuf = <uint8_t*> malloc(TX_CAP)
        self.rxbuf = <uint8_t*> malloc(RX_CAP)
        if self.txbuf == NULL or self.rxbuf == NULL or \
                dsvpn_fq_init(&self.fq, FQ_RING, FQ_PKTS, FQ_LIMIT, seed) != 0:
            raise MemoryError()
        cdef int i
        for i in range(MAX_PENDING):
            self.pend[i].fd = -1

    def __init__(self, int tun_fd, key, *, bint is_server, int wake_fd=-1, int listen_fd=-1,
                 int control_fd=-1, bint tun_header=False, int af_inet=2, int af_inet6=10,
                 int mtu=9000, bint vnet_hdr=False, client_ip4=None, client_ip6=None,
                 int mark=0, bint require_pfs=False):
        cdef const uint8_t[:] k = bytes(key)
        if k.shape[0] != CHARM_KEY_LEN:
            raise ValueError(f"the key must be exactly {CHARM_KEY_LEN} bytes")
        tun_setup(&self.tun, mtu, tun_header, af_inet, af_inet6, vnet_hdr)
        self.tun.fd = tun_fd
        self.wake_fd = wake_fd
        self.control_fd = control_fd
        self.listen_fd = listen_fd
        self.is_server = is_server
        self.mtu = <size_t> mtu
        self.mark = mark
        self._set_source(client_ip4, client_ip6)
        self.accept_timeout_ms = ACCEPT_TIMEOUT_MS
        self.connect_timeout_ms = TIMEOUT_MS
        self.send_timeout_ms = TIMEOUT_MS
        self.rxw.queue_us = RXW_QUEUE_US
        self.require_pfs = require_pfs
        charm_init(&self.kx, &k[0], <const uint8_t*> KX_IV)
        charm_init(&self.pkx, &k[0], <const uint8_t*> PFS_IV)
        if is_server:
            self.prob_buf = <uint8_t*> malloc(PROB_CAP)
            if self.prob_buf == NULL:
                raise MemoryError()
        # The loop drains the tun until EAGAIN, so its reads must not block.
        if dsvpn_set_nonblock(tun_fd) != 0:
            raise OSError(errno, strerror(errno).decode())

    cdef int _set_source(self, client_ip4, client_ip6) except -1:
        """The addresses a client may send from (None, None: any)."""
        import ipaddress

        if client_ip4 is None:
            if client_ip6 is not None:
                raise ValueError("client_ip6 needs client_ip4")
            self.check_src = False
            return 0
        if client_ip6 is None:
            from dsvpn.config import tun_ip6

            client_ip6 = tun_ip6(client_ip4)
        cdef bytes a4 = ipaddress.IPv4Address(client_ip4).packed
        cdef bytes a6 = ipaddress.IPv6Address(client_ip6).packed
        memcpy(self.src4, <const char*> a4, 4)
        memcpy(self.src6, <const char*> a6, 16)
        self.check_src = True
        return 0

    def __dealloc__(self):
        self._close_all(b"loop closed")
        free(self.txbuf)
        free(self.rxbuf)
        free(self.prob_buf)
        dsvpn_fq_destroy(&self.fq)
        free(self.trand.buf)
        memset(&self.kx, 0, sizeof(charm_state))
        memset(&self.pkx, 0, sizeof(charm_state))

    # ---------------------------------------------------------------- helpers

    cdef void _push(self, Event code, const char* msg) noexcept nogil:
        events_push(&self.ev, code, msg)

    cdef int _random(self, uint8_t* out, size_t n) noexcept nogil:
        return take_random(&self.trand, out, n)

    cdef int64_t _wall(self) noexcept nogil:
        return self.tclock if self.has_tclock else dsvpn_wall_s()

    cdef void _drop_client_hs(self) noexcept nogil:
        if self.hs_fd >= 0:
            close(self.hs_fd)
            self.hs_fd = -1
        memset(&self.hs_st, 0, sizeof(charm_state))

    cdef void _drop_pending(self, int i) noexcept nogil:
        if self.pend[i].fd >= 0:
            close(self.pend[i].fd)
            self.pend[i].fd = -1
        self.pend[i].stage = PEND_BASE
        memset(&self.pend[i].st, 0, sizeof(charm_state))

    cdef void _drop_probation(self) noexcept nogil:
        if self.prob_fd >= 0:
            close(self.prob_fd)
            self.prob_fd = -1
        memset(&self.prob_tx, 0, sizeof(charm_state))
        memset(&self.prob_rx, 0, sizeof(charm_state))
        self.prob_len = 0

    cdef void _close_all(self, const char* why) noexcept nogil:
        cdef int i
        self._drop_session(why)
        self._drop_client_hs()
        self._drop_probation()
        for i in range(MAX_PENDING):
            self._drop_pending(i)

    # ---------------------------------------------------------------- sessions

    cdef void _install(self, int fd, charm_state* st, const dsvpn_addr* peer) noexcept nogil:
        """The classic handshake on fd succeeded: derive the session key from its state (the
        hash of the empty message, docs/protocol.md, Handshake) and complete it."""
        cdef uint8_t k[CHARM_HASH_LEN]
        charm_hash(st, NULL, 0, k)
        memset(st, 0, sizeof(charm_state))
        self._complete(fd, k, peer, False)
        memset(k, 0, CHARM_HASH_LEN)

    cdef void _direction_states(self, charm_state* tx, charm_state* rx,
                                const uint8_t* key) noexcept nogil:
        """One duplex state per direction from the session key, the IVs differing in their
        first byte (the server sends with 1, the client with 0): docs/protocol.md, Direction
        states."""
        cdef uint8_t iv[CHARM_IV_LEN]
        memset(iv, 0, CHARM_IV_LEN)
        iv[0] = 1 if self.is_server else 0
        charm_init(tx, key, iv)
        iv[0] ^= 1
        charm_init(rx, key, iv)

    cdef void _complete(self, int fd, const uint8_t* key, const dsvpn_addr* peer,
                        bint pfs) noexcept nogil:
        """A handshake on fd succeeded with session key key. While a session is live (on a
        server, necessarily from the same address) fd goes on probation; otherwise it becomes
        the session."""
        self.c.handshakes_ok += 1
        if pfs:
            self.c.handshakes_pfs += 1
        if self.sock >= 0 and self.is_server:
            self._probation_start(fd, key, peer, pfs)
            return
        self._drop_session(b"replaced by a new connection")
        self._direction_states(&self.tx_st, &self.rx_st, key)
        self._session_up(fd, peer, pfs, dsvpn_wall_s())

    cdef void _session_up(self, int fd, const dsvpn_addr* peer, bint pfs,
                          int64_t handshake_time) noexcept nogil:
        """fd becomes the session (tx_st and rx_st are already keyed)."""
        self.sock = fd
        self.peer_addr = peer[0]
        self.cur.since = dsvpn_wall_s()
        self.cur.latest_handshake = handshake_time
        self.cur.pfs = pfs
        self.cur.ended = 0
        self.cur.base = self.c.t
        # the packets dropped for want of a session just before this one count as its own
        self.cur.base.drops[<int> DROP_NO_SESSION] = self.gap_base
        snprintf(self.cur.endpoint, DSVPN_ENDPOINT_TEXT, "%s", self.peer_addr.endpoint)
        self._push(EV_SESSION_UP, self.peer_addr.ip)

    cdef void _drop_session(self, const char* why) noexcept nogil:
        """Close the session, if any, and keep its record (why it ended) for ended_session();
        no event."""
        if self.sock >= 0:
            close(self.sock)
            self.sock = -1
            self.last = self.cur
            self.last.base = traffic_since(&self.c.t, &self.cur.base)
            self.last.ended = dsvpn_wall_s()
            snprintf(self.last.reason, MSG_LEN, "%s", why)
            self.has_last = True
            self.gap_base = self.c.t.drops[<int> DROP_NO_SESSION]
        self.gen += 1
        memset(&self.tx_st, 0, sizeof(charm_state))
        memset(&self.rx_st, 0, sizeof(charm_state))
        self.tx_off = self.tx_end = 0
        dsvpn_fq_reset(&self.fq)
        self.rxw.window = 0
        self.rx_len = 0
        self.tun.gro.segs = 0
        self.congestion = False

    # ---------------------------------------------------------------- probation (server)

    cdef void _probation_start(self, int fd, const uint8_t* key, const dsvpn_addr* peer,
                               bint pfs) noexcept nogil:
        """A handshake from the live session's address completed on fd: keep the session and
        hold fd until its first frame authenticates, which a replayed hello cannot achieve.
        One place: a newer connection takes it."""
        cdef char msg[MSG_LEN]
        if self.prob_fd >= 0:
            self._probation_fail(b"a newer connection from the same address completed its "
                                 b"handshake")
        self._direction_states(&self.prob_tx, &self.prob_rx, key)
        self.prob_fd = fd
        self.prob_addr = peer[0]
        self.prob_pfs = pfs
        self.prob_hs = dsvpn_wall_s()
        self.prob_deadline = dsvpn_now_ms() + self.accept_timeout_ms
        self.prob_len = 0
        snprintf(msg, MSG_LEN, "new connection from %s: it replaces the active session once "
                 "its first frame authenticates", peer.ip)
        self._push(EV_LOG, msg)

    cdef void _probation_fail(self, const char* why) noexcept nogil:
        cdef char msg[MSG_LEN]
        snprintf(msg, MSG_LEN, "new connection from %s closed before it replaced the active "
                 "session: %s", self.prob_addr.ip, why)
        self._drop_probation()
        self.c.probation_closed += 1
        self._push(EV_LOG, msg)

    cdef void _promote(self, const char* why) noexcept nogil:
        """The connection on probation becomes the session; the live one, if any, is closed
        (why: the reason its record keeps)."""
        cdef int fd = self.prob_fd
        cdef dsvpn_addr peer = self.prob_addr
        self._drop_session(why)
        self.tx_st = self.prob_tx
        self.rx_st = self.prob_rx
        self.prob_fd = -1
        memset(&self.prob_tx, 0, sizeof(charm_state))
        memset(&self.prob_rx, 0, sizeof(charm_state))
        self._session_up(fd, &peer, self.prob_pfs, self.prob_hs)

    cdef void _probation_orphan(self) noexcept nogil:
        """The live session ended while a connection was on probation: that one takes over."""
        cdef size_t got = self.prob_len
        if self.sock < 0 and self.prob_fd >= 0:
            self._promote(b"")
            # The start of its first frame, if read, goes on from the session's buffer.
            memcpy(self.rxbuf, self.prob_buf, got)
            self.rx_len = got
            self.c.t.rx_bytes += got
            self.prob_len = 0

    cdef void _probation_io(self) noexcept nogil:
        """Read the first frame of the connection on probation (exactly that frame: what follows
        stays in the socket for the session); once it authenticates, the connection replaces
        the session and the frame's packet is delivered."""
        cdef ssize_t n
        cdef size_t need, plen
        cdef int drop
        while True:
            need = FRAME_HDR_LEN
            if self.prob_len >= FRAME_HDR_LEN:
                need += frame_len(self.prob_buf)
            if self.prob_len == need:
                break
            n = dsvpn_read(self.prob_fd, self.prob_buf + self.prob_len, need - self.prob_len)
            if n == DSVPN_IO_AGAIN:
                return
            if n == 0:
                self._probation_fail(b"connection closed")
                return
            if n < 0:
                self._probation_fail(strerror(errno))
                return
            self.prob_len += <size_t> n
        plen = need - FRAME_HDR_LEN
        if frame_open(&self.prob_rx, self.prob_buf, plen) != 0:
            self._probation_fail(b"its first frame failed authentication (a replayed hello?)")
            return
        self.prob_len = 0
        self._promote(b"replaced by a new session from the same address")
        self.c.t.rx_bytes += need
        self.c.t.rx_packets += 1
        if plen > 0:
            drop = self._admit(self.prob_buf + FRAME_HDR_LEN, plen)
            if drop < 0:
                tun_write(&self.tun, self.prob_buf, plen)
                dsvpn_gro_flush(self.tun.fd, &self.tun.gro)
            else:
                self.c.t.drops[drop] += 1

    cdef void _session_down(self, const char* why) noexcept nogil:
        self._drop_session(why)
        self._push(EV_SESSION_DOWN, why)

    cdef void _session_down_errno(self, const char* fmt, int err) noexcept nogil:
        cdef char msg[MSG_LEN]
        snprintf(msg, MSG_LEN, fmt, strerror(err))
        self._session_down(msg)

    cdef bint _busy_for(self, const dsvpn_addr* addr) noexcept nogil:
        """A session is up with another IP address: addr must be refused."""
        return self.sock >= 0 and memcmp(addr.key, self.peer_addr.key, 16) != 0

    # ---------------------------------------------------------------- server side

    cdef void _accept(self, int64_t now) noexcept nogil:
        cdef int _n, fd, i
        cdef bint full
        cdef dsvpn_addr addr
        cdef char msg[MSG_LEN]
        for _n in range(ACCEPT_BUDGET):
            fd = dsvpn_accept(self.listen_fd, &addr)
            if fd < 0:
                return  # EAGAIN, or a transient error (ECONNABORTED, EMFILE): retried next poll
            if self._busy_for(&addr):
                close(fd)
                snprintf(msg, MSG_LEN, REFUSED_FMT, addr.ip, self.peer_addr.ip)
                self._push(EV_LOG, msg)
                continue
            # Only the client's mark is vital (tcp_options); here an error is ignored.
            dsvpn_tcp_opts(fd, self.mark, TIMEOUT_MS, NOTSENT_LOWAT)
            i = pending_slot(self.pend, MAX_PENDING, &full)
            if full:
                self._pending_fail(i, TOO_MANY_FMT, b"")
            self.pend_seq += 1
            pending_start(&self.pend[i], fd, &addr, self.pend_seq, now + self.accept_timeout_ms)
            self.pend[i].st = self.kx

    cdef void _pending_fail(self, int i, const char* fmt, const char* arg) noexcept nogil:
        """Drop pending handshake i and log fmt, formatted with its peer's IP and arg."""
        cdef char msg[MSG_LEN]
        snprintf(msg, MSG_LEN, fmt, self.pend[i].addr.ip, arg)
        self._drop_pending(i)
        self.c.handshakes_failed += 1
        self._push(EV_LOG, msg)

    cdef void _pending_io(self, int i) noexcept nogil:
        """A hello is arriving on pending handshake i. Classic (docs/protocol.md, Handshake):
        answer with pkt2 and complete it. Extended (Extensions): hand it to Python."""
        cdef Pending* p = &self.pend[i]
        cdef const char* why
        cdef char ip[DSVPN_IP_TEXT]
        cdef char arg[MSG_LEN]
        cdef int fd
        if p.stage == PEND_BASE:
            if not self._pending_read(i, PKT1_LEN):
                return
            if self._classic_hello(p):
                if self.require_pfs:
                    self._pending_fail(i, CLASSIC_REFUSED_FMT, b"")
                    return
                why = self._check_ts(p.buf, arg)
                if why != NULL:
                    self._pending_fail(i, why, arg)
                    return
                if self._busy_for(&p.addr):
                    # Another client's session came up while this one was shaking hands.
                    self._pending_fail(i, REFUSED_FMT, self.peer_addr.ip)
                    return
                if not self._send_pkt2(i):
                    return
                fd = p.fd
                p.fd = -1
                self._install(fd, &p.st, &p.addr)
                return
            # Not a classic hello with our key: perhaps the start of an extended one.
            p.stage = PEND_EXTENDED
        if p.stage != PEND_EXTENDED or not self._pending_read(i, PFS_HELLO_LEN):
            return
        why = self._verify_pfs_hello(p, arg)
        if why != NULL:
            self._pending_fail(i, why, arg)
            return
        if self._busy_for(&p.addr):
            self._pending_fail(i, REFUSED_FMT, self.peer_addr.ip)
            return
        p.stage = PEND_READY
        snprintf(ip, DSVPN_IP_TEXT, "%s", p.addr.ip)
        self._push(EV_PFS_HELLO, ip)

    cdef bint _pending_read(self, int i, int upto) noexcept nogil:
        """Read what has arrived of the hello, up to byte upto; True once there."""
        cdef const char* lost = NULL
        if pending_read(&self.pend[i], upto, &lost):
            return True
        if lost != NULL:
            self._pending_lost(i, lost)
        return False

    cdef void _pending_lost(self, int i, const char* what) noexcept nogil:
        """Pending handshake i ended (closed, error, deadline) before its hello was whole."""
        cdef const char* fmt = lost_fmt(&self.pend[i], &what)
        self._pending_fail(i, fmt, what)

    cdef bint _classic_hello(self, Pending* p) noexcept nogil:
        """p.buf[0..72) is a classic hello under our key. Advances p.st (a copy of the
        key-exchange state) over its first 40 bytes, as the session key derivation expects."""
        return hello_verifies(&p.st, p.buf, HS_RANDOM_LEN + HS_TIMESTAMP_LEN)

    cdef const char* _verify_pfs_hello(self, Pending* p, char* arg) noexcept nogil:
        """NULL if p.buf holds an authentic, fresh extended hello, else the log format (%s:
        the peer's IP, then arg: see _check_ts). p.st becomes the transcript state after H1."""
        arg[0] = 0
        p.st = self.pkx
        if not hello_verifies(&p.st, p.buf, PKT1_LEN):
            return BAD_HELLO_FMT
        return self._check_ts(p.buf, arg)

    cdef const char* _check_ts(self, const uint8_t* hello, char* arg) noexcept nogil:
        """NULL if the (authenticated) timestamp of a hello is within the window, else the
        log format (%s: the peer's IP, then arg, MSG_LEN bytes, filled in here: by how much
        the clocks differ, so the operator knows which one to fix)."""
        cdef int64_t ts = hello_ts(hello)
        cdef int64_t diff
        arg[0] = 0
        if ts < 0:
            snprintf(arg, MSG_LEN, "its timestamp is out of range")
            return CLOCK_FMT
        diff = ts - self._wall()
        if not ts_in_window(diff):
            snprintf(arg, MSG_LEN, "its clock is %lld s %s ours (at most %d s)",
                     <long long> (diff if diff > 0 else -diff),
                     <const char*> (b"ahead of" if diff > 0 else b"behind"), <int> TS_TOLERANCE_S)
            return CLOCK_FMT
        return NULL

    cdef bint _send_pkt2(self, int i) noexcept nogil:
        """Answer pending handshake i with pkt2; False (handshake failed and logged) if the
        random source or the send fails."""
        cdef Pending* p = &self.pend[i]
        cdef uint8_t pkt2[PKT2_LEN]
        cdef char why[MSG_LEN]
        cdef int err = self._random(pkt2, HS_RANDOM_LEN)
        if err != 0:
            snprintf(why, MSG_LEN, "%s: %s", NO_RANDOM, strerror(err))
            self._pending_fail(i, HS_FAILED_FMT, why)
            return False
        charm_hash(&p.st, pkt2, HS_RANDOM_LEN, pkt2 + HS_RANDOM_LEN)
        # One non-blocking write; a fresh socket always has room for 64 bytes.
        if dsvpn_send(p.fd, pkt2, PKT2_LEN) != PKT2_LEN:
            self._pending_fail(i, HS_FAILED_FMT, b"could not send the reply")
            return False
        return True

    # ---------------------------------------------------------------- client side

    cdef void _client_fail(self, const char* why) noexcept nogil:
        self._drop_client_hs()
        self.c.handshakes_failed += 1
        self._push(EV_HANDSHAKE_FAILED, why)

    cdef void _client_fail_errno(self, const char* fmt, int err) noexcept nogil:
        cdef char msg[MSG_LEN]
        snprintf(msg, MSG_LEN, fmt, strerror(err))
        self._client_fail(msg)

    cdef void _client_start(self, int fd) noexcept nogil:
        """Start the handshake on connected socket fd: build pkt1 and send what fits."""
        cdef uint64_t ts
        cdef int j, err
        cdef char msg[MSG_LEN]
        cdef uint8_t* stamp = self.hs_out + HS_RANDOM_LEN
        self._drop_session(b"replaced by a new connection")
        self._drop_client_hs()
        self.hs_fd = fd
        self.hs_sent = self.hs_got = 0
        self.hs_deadline = dsvpn_now_ms() + self.connect_timeout_ms
        self.hs_st = self.kx
        err = self._random(self.hs_out, HS_RANDOM_LEN)
        if err != 0:
            snprintf(msg, MSG_LEN, "%s: %s", NO_RANDOM, strerror(err))
            self._client_fail(msg)
            return
        ts = <uint64_t> self._wall()
        for j in range(HS_TIMESTAMP_LEN):
            stamp[j] = <uint8_t> (ts >> (8 * j))
        charm_hash(&self.hs_st, self.hs_out, HS_RANDOM_LEN + HS_TIMESTAMP_LEN,
                   stamp + HS_TIMESTAMP_LEN)
        self._client_io(0)

    cdef void _client_io(self, short rev) noexcept nogil:
        if self.hs_sent < PKT1_LEN and not self._client_send():
            return
        if (rev & (POLLIN | POLLHUP | POLLERR)) and self._client_read():
            self._client_finish()

    cdef bint _client_send(self) noexcept nogil:
        """Send what is left of pkt1; True once all of it is out."""
        cdef ssize_t n
        while self.hs_sent < PKT1_LEN:
            n = dsvpn_send(self.hs_fd, self.hs_out + self.hs_sent, PKT1_LEN - self.hs_sent)
            if n == DSVPN_IO_AGAIN or n == 0:
                return False
            if n < 0:
                self._client_fail_errno(b"write error: %s", errno)
                return False
            self.hs_sent += <int> n
        return True

    cdef bint _client_read(self) noexcept nogil:
        """Read what has arrived of pkt2; True once it is complete. Exactly its 64 bytes:
        frames may follow at once and belong to the session."""
        cdef ssize_t n = dsvpn_read(self.hs_fd, self.hs_in + self.hs_got, PKT2_LEN - self.hs_got)
        if n == DSVPN_IO_AGAIN:
            return False
        # A server that refuses us closes without reading pkt1, which the kernel turns into a
        # reset rather than EOF: both mean the same thing to the user.
        if n == 0 or (n < 0 and errno == ECONNRESET):
            self._client_fail(CLIENT_EOF_MSG)
            return False
        if n < 0:
            self._client_fail_errno(b"read error: %s", errno)
            return False
        self.hs_got += <int> n
        return self.hs_got == PKT2_LEN

    cdef void _client_finish(self) noexcept nogil:
        """pkt2 is complete: check the server's proof of the key and make fd the session."""
        cdef dsvpn_addr peer
        cdef int fd
        if not hello_verifies(&self.hs_st, self.hs_in, HS_RANDOM_LEN):
            self._client_fail(b"the server's reply failed authentication: wrong key?")
            return
        fd = self.hs_fd
        self.hs_fd = -1
        dsvpn_peer(fd, &peer)
        self._install(fd, &self.hs_st, &peer)

    cdef void _client_adopt(self, int fd, const uint8_t* key) noexcept nogil:
        """fd completed the forward-secret handshake in Python with session key key: make it
        the session, and send one empty frame at once so that the server can take the
        connection off probation without waiting for traffic (docs/protocol.md, Replay)."""
        cdef dsvpn_addr peer
        cdef int64_t now = dsvpn_now_ms()
        self._drop_session(b"replaced by a new connection")
        self._drop_client_hs()
        dsvpn_peer(fd, &peer)
        self._complete(fd, key, &peer, True)
        frame_seal(&self.tx_st, self.txbuf, 0)
        self.tx_end = FRAME_HDR_LEN
        self.c.t.tx_packets += 1
        self.tx_since = now
        self._flush(now)

    # ---------------------------------------------------------------- tun -> session

    cdef void _flush(self, int64_t now) noexcept nogil:
        """Send what is queued in txbuf, as far as the socket takes it."""
        cdef ssize_t n = dsvpn_send(self.sock, self.txbuf + self.tx_off, self.tx_end - self.tx_off)
        if n > 0:
            self.tx_off += <size_t> n
            self.c.t.tx_bytes += <uint64_t> n
            self.tx_since = now
            if self.tx_off == self.tx_end:
                self.tx_off = self.tx_end = 0
            return      # else the socket is full: wait for POLLOUT
        if n == DSVPN_IO_AGAIN:
            if BUFFERBLOAT_CONTROL:
                self.congestion = True
            return
        self._session_down_errno(b"write error: %s", errno if n < 0 else 0)

    cdef void _tun_stop(self, ssize_t n) noexcept nogil:
        """A tun read returned n <= 0: nothing more to read, or a fatal error (event)."""
        cdef const char* why = tun_error(n)
        if why != NULL:
            self._push(EV_TUN_ERROR, why)

    cdef void _tun_discard(self) noexcept nogil:
        """No session: read and drop what the tun has (up to DISCARD_PKTS packets)."""
        cdef int _i
        cdef ssize_t n
        for _i in range(DISCARD_PKTS):
            # (with a vnet header, the header simply lands at the start of the buffer)
            n = dsvpn_read(self.tun.fd, self.txbuf, TUN_READ_MAX + AF_HDR_LEN + DSVPN_VNET_HDR_LEN)
            if n <= 0:
                self._tun_stop(n)
                return
            self.tun.rx_packets += 1
            self.tun.rx_bytes += <uint64_t> n
            self.c.t.drops[<int> DROP_NO_SESSION] += 1

    cdef void _tun_fill(self, int64_t now) noexcept nogil:
        """Drain the tun into the flow queue (up to TUN_FILL_PKTS packets). A lone small packet
        arriving while nothing waits is sent at once."""
        cdef int count = 0
        cdef ssize_t n, slot
        cdef size_t plen, hoff = tun_hdr_len(&self.tun)
        cdef uint8_t hdr[DSVPN_FQ_HDR_MAX]
        cdef uint8_t* pkt
        cdef bint idle
        while count < TUN_FILL_PKTS:
            slot = dsvpn_fq_slot(&self.fq, TUN_READ_MAX)
            if slot < 0:
                return      # full: the tun's own queue holds the rest (backpressure)
            pkt = self.fq.ring + slot
            n = tun_read(&self.tun, hdr, pkt)
            if n == TUN_SHORT:
                count += 1
                continue
            if n <= 0:
                self._tun_stop(n)
                return
            count += 1
            plen = <size_t> n
            idle = self.fq.packets == 0 and self.tx_end == self.tx_off
            if idle:
                self.tx_since = now     # the send timeout counts from here
            dsvpn_fq_commit(&self.fq, <size_t> slot, plen, hdr, hoff)
            if idle and count == 1 and plen <= QUICK_MAX and not bulk_ack(pkt, plen):
                # Latency: a lone small packet (ping, DNS, a keystroke, a request) goes out now,
                # not after the read that would only confirm the tun is empty and one more
                # poll() for room in the socket. Pure ACKs and large packets wait for the batch.
                self._tx_batch(now)
                if self.sock < 0:
                    return

    cdef void _tx_batch(self, int64_t now) noexcept nogil:
        """Frame packets from the flow queue into the empty txbuf (sendq.pxd) and send the
        batch."""
        cdef Framer fr
        fr.st, fr.tun, fr.t, fr.total = &self.tx_st, &self.tun, &self.c.t, NULL
        fr.congestion = &self.congestion
        fr.oversize, fr.congested = DROP_OVERSIZE, DROP_CONGESTION
        send_batch(&fr, &self.fq, self.txbuf, &self.tx_end)
        if self.tx_end > self.tx_off:
            if self.tx_off == 0 and self.tx_since < now:
                self.tx_since = now
            self._flush(now)

    # ---------------------------------------------------------------- session -> tun

    cdef void _sock_read(self) noexcept nogil:
        cdef ssize_t n = dsvpn_read(self.sock, self.rxbuf + self.rx_len, RX_CAP - self.rx_len)
        cdef ssize_t used
        if n == DSVPN_IO_AGAIN:
            return
        if n == 0:
            self._session_down(b"connection closed by peer")
            return
        if n < 0:
            self._session_down_errno(b"read error: %s", errno)
            return
        self.c.t.rx_bytes += <uint64_t> n
        self.rx_len += <size_t> n
        used = self._frames()
        if used < 0:
            return
        # Merged packets point into rxbuf: write them before it is compacted.
        dsvpn_gro_flush(self.tun.fd, &self.tun.gro)
        rx_consume(self.rxbuf, &self.rx_len, <size_t> used)
        return

    cdef ssize_t _frames(self) noexcept nogil:
        """Decrypt and deliver every complete frame in rxbuf. Returns the bytes used (the
        partial frame after them stays), or -1 if a bad tag ended the session."""
        cdef size_t pos = 0, plen
        cdef uint8_t* p
        cdef int drop
        while self.rx_len - pos >= FRAME_HDR_LEN:
            p = self.rxbuf + pos
            plen = frame_len(p)
            if self.rx_len - pos < FRAME_HDR_LEN + plen:
                break
            if frame_open(&self.rx_st, p, plen) != 0:
                # Frames before this one were already written to the tun, as in the reference.
                dsvpn_gro_flush(self.tun.fd, &self.tun.gro)
                self.c.t.drops[<int> DROP_BAD_TAG] += 1
                self._session_down(b"corrupted stream")
                return -1
            self.c.t.rx_packets += 1
            if plen > 0:
                drop = self._admit(p + FRAME_HDR_LEN, plen)
                if drop < 0:
                    tun_write(&self.tun, p, plen)
                else:
                    self.c.t.drops[drop] += 1
            pos += FRAME_HDR_LEN + plen
        return <ssize_t> pos

    cdef inline int _admit(self, const uint8_t* pkt, size_t plen) noexcept nogil:
        """-1 if the decrypted packet may go to the tun, else the Drop reason."""
        if plen > self.mtu:
            return DROP_OVERSIZE
        if not self.check_src:
            return -1
        return admit_source(pkt, plen, self.src4, self.src6)

    # ---------------------------------------------------------------- the loop

    cdef inline bint _tx_waiting(self) noexcept nogil:
        """Something waits to be sent: a batch, or packets in the flow queue."""
        return self.tx_end > self.tx_off or self.fq.packets > 0

    cdef void _deadlines(self, int64_t now) noexcept nogil:
        cdef int i
        for i in range(MAX_PENDING):
            if self.pend[i].fd >= 0 and now >= self.pend[i].deadline:
                if unmatched(&self.pend[i]):
                    self._pending_lost(i, b"handshake timeout")
                else:
                    self._pending_fail(i, b"handshake timeout from %s", b"")
        if self.hs_fd >= 0 and now >= self.hs_deadline:
            self._client_fail(b"handshake timed out")
        if self.prob_fd >= 0 and now >= self.prob_deadline:
            self._probation_fail(PROB_TIMEOUT_MSG)
        if (self.sock >= 0 and self._tx_waiting()
                and now - self.tx_since >= self.send_timeout_ms):
            self._session_down(b"send timeout")
        self._probation_orphan()

    cdef int64_t _next_deadline(self, int64_t limit) noexcept nogil:
        cdef int i
        for i in range(MAX_PENDING):
            if self.pend[i].fd >= 0 and self.pend[i].deadline < limit:
                limit = self.pend[i].deadline
        if self.hs_fd >= 0 and self.hs_deadline < limit:
            limit = self.hs_deadline
        if self.prob_fd >= 0 and self.prob_deadline < limit:
            limit = self.prob_deadline
        if (self.sock >= 0 and self._tx_waiting()
                and self.tx_since + self.send_timeout_ms < limit):
            limit = self.tx_since + self.send_timeout_ms
        return limit

    cdef void _poll_set(self, PollSet* ps) noexcept nogil:
        """What to wait for: every descriptor the loop serves, in this state."""
        cdef int i
        ps.n = 0
        ps.wake = poll_add(ps, self.wake_fd, POLLIN) if self.wake_fd >= 0 else -1
        ps.control = poll_add(ps, self.control_fd, POLLIN) if self.control_fd >= 0 else -1
        ps.sock = -1
        if self.sock >= 0:
            ps.sock = poll_add(ps, self.sock, POLLIN | POLLOUT if self._tx_waiting() else POLLIN)
        # Backpressure: the tun is read while the flow queue has room (always without a session:
        # the packets are discarded).
        ps.tun = -1
        if self.sock < 0 or dsvpn_fq_room(&self.fq, TUN_READ_MAX):
            ps.tun = poll_add(ps, self.tun.fd, POLLIN)
        ps.hs = -1
        if self.hs_fd >= 0:
            ps.hs = poll_add(ps, self.hs_fd,
                             POLLIN | POLLOUT if self.hs_sent < PKT1_LEN else POLLIN)
        for i in range(MAX_PENDING):
            ps.pend[i] = -1
            # (a hello waiting for Python has nothing more to read)
            if self.pend[i].fd >= 0 and self.pend[i].stage <= PEND_EXTENDED:
                ps.pend[i] = poll_add(ps, self.pend[i].fd, POLLIN)
                ps.pseq[i] = self.pend[i].seq
        ps.prob = poll_add(ps, self.prob_fd, POLLIN) if self.prob_fd >= 0 else -1
        ps.listen = -1
        if self.listen_fd >= 0 and self.is_server:
            ps.listen = poll_add(ps, self.listen_fd, POLLIN)

    cdef void _dispatch(self, PollSet* ps, uint64_t gen, int64_t now) noexcept nogil:
        """Serve what poll() found ready. gen is the session generation polled for: a socket
        replaced in the meantime is not served from stale readiness."""
        cdef uint64_t wrote = self.tun.tx_packets
        cdef short rev
        cdef int i
        cdef bint room = False
        if revents(ps, ps.wake):
            self._drain_wake()
        if revents(ps, ps.control):
            self._push(EV_CONTROL, b"")  # left unread: Python answers it
        rev = revents(ps, ps.sock)
        if rev and gen == self.gen:
            if rev & (POLLIN | POLLHUP | POLLERR):
                self._sock_read()
            if gen == self.gen and (rev & POLLOUT):
                room = True
                if self.tx_end > self.tx_off:
                    self._flush(now)
        # Writing to the tun usually makes the answer (a forwarded reply, the local stack's
        # ACK) ready at once, in the same call: read it now, not after one more poll() round.
        if ps.tun >= 0 and (revents(ps, ps.tun) or (
                self.tun.tx_packets != wrote and self.sock >= 0)):
            if self.sock < 0:
                self._tun_discard()
            else:
                self._tun_fill(now)
        # A new batch only when poll() said the socket has room: a send that could take
        # nothing would cost a packet (BUFFERBLOAT_CONTROL).
        if room and gen == self.gen and self.tx_end == self.tx_off and self.fq.packets > 0:
            self._tx_batch(now)
        rev = revents(ps, ps.hs)
        if rev and self.hs_fd == ps.fds[ps.hs].fd:
            self._client_io(rev)
        for i in range(MAX_PENDING):
            # seq check: the slot may have been dropped or reused in this iteration
            if ps.pend[i] >= 0 and self.pend[i].fd >= 0 and self.pend[i].seq == ps.pseq[i] \
                    and revents(ps, ps.pend[i]):
                self._pending_io(i)
        if revents(ps, ps.prob) and self.prob_fd == ps.fds[ps.prob].fd:
            self._probation_io()
        if revents(ps, ps.listen):
            self._accept(now)
        self._probation_orphan()

    cdef void _drain_wake(self) noexcept nogil:
        dsvpn_drain(self.wake_fd)
        self._push(EV_WAKE, b"")

    cdef void _run(self, int64_t timeout_ms) noexcept nogil:
        cdef PollSet ps
        cdef int r, err, wait
        cdef uint64_t gen
        cdef int64_t now = dsvpn_now_ms()
        cdef int64_t end = now + timeout_ms if timeout_ms >= 0 else -1
        cdef int64_t nxt
        while True:
            self._deadlines(now)
            if self.ev.count:
                return
            self._poll_set(&ps)
            nxt = self._next_deadline(end if end >= 0 else now + 3600000)
            wait = <int> (nxt - now) if nxt > now else 0
            gen = self.gen
            r = poll(ps.fds, ps.n, wait)
            err = errno
            now = dsvpn_now_ms()
            if r < 0 and err == EINTR and self.wake_fd < 0:
                # Nobody else will tell Python about the signal.
                self._push(EV_WAKE, b"")
                return
            if r > 0:
                self._dispatch(&ps, gen, now)
            if self.sock >= 0 and rx_budget_due(&self.rxw, now):
                rx_budget_set(&self.rxw, self.sock, now, self.c.t.rx_bytes)
            if self.ev.count or (end >= 0 and now >= end):
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
        with nogil:
            self._client_start(own)

    def adopt(self, int fd, key):
        """Client: fd completed the forward-secret handshake (dsvpn.pfs) with session key key;
        make it the session. The loop owns fd from now on, also when this raises."""
        cdef int own = fd
        cdef const uint8_t[:] k
        if self.closed or self.is_server:
            close(own)
            if self.closed:
                raise RuntimeError("loop is closed")
            raise ValueError("adopt() is for client loops")
        try:
            k = key
            if k.shape[0] != CHARM_KEY_LEN:
                raise ValueError(f"the session key must be exactly {CHARM_KEY_LEN} bytes")
        except BaseException:
            close(own)
            raise
        dsvpn_set_cloexec(own)
        if dsvpn_set_nonblock(own) != 0:
            close(own)
            raise OSError(errno, strerror(errno).decode())
        with nogil:
            self._client_adopt(own, &k[0])

    def take_pfs_hello(self):
        """Server: the next verified extended hello waiting for its reply, or None; see
        _loop.pyi."""
        cdef int i = pending_ready(self.pend, MAX_PENDING)
        if i < 0:
            return None
        return take_hello(&self.pend[i], self.pend[i].addr.ip.decode())

    def pfs_reply(self, uint64_t token, reply, key):
        """Server: send the extended reply of the hello take_pfs_hello() returned with token,
        and complete the handshake with session key key. False if that handshake is gone
        (timed out, dropped) or failed now (logged)."""
        cdef const uint8_t[:] r = reply
        cdef const uint8_t[:] k = key
        cdef int i, fd
        check_reply(r.shape[0], k.shape[0])
        i = pending_taken(self.pend, MAX_PENDING, token)
        if i < 0:
            return False
        if self._busy_for(&self.pend[i].addr):
            self._pending_fail(i, REFUSED_FMT, self.peer_addr.ip)
            return False
        # One non-blocking write; a fresh socket always has room for 96 bytes.
        if dsvpn_send(self.pend[i].fd, &r[0], PFS_REPLY_LEN) != PFS_REPLY_LEN:
            self._pending_fail(i, HS_FAILED_FMT, b"could not send the reply")
            return False
        fd = self.pend[i].fd
        self.pend[i].fd = -1
        self.pend[i].stage = PEND_BASE
        self._complete(fd, &k[0], &self.pend[i].addr, True)
        return True

    def pfs_abort(self, uint64_t token, str why):
        """Server: the hello of token cannot be answered (why, e.g. a low-order public key):
        close the connection without a reply and log it, naming the client."""
        cdef int i = pending_taken(self.pend, MAX_PENDING, token)
        cdef bytes w = why.encode("utf-8", "replace")
        if i >= 0:
            self._pending_fail(i, HS_FAILED_FMT, w)
        return i >= 0

    def run(self, int timeout_ms):
        """Run until the first event or timeout_ms (negative: no timeout); see _loop.pyi."""
        if self.closed:
            raise RuntimeError("loop is closed")
        if self.ev.count == 0:
            with nogil:
                self._run(timeout_ms)
        return events_next(&self.ev, Event)

    def disconnect(self):
        """Drop the session and every handshake in progress (no event)."""
        self._close_all(b"disconnected locally")

    def close(self):
        """Close every socket the loop owns. The loop cannot be used afterwards."""
        self._close_all(b"loop closed")
        self.closed = True

    @property
    def session_active(self):
        return self.sock >= 0

    @property
    def peer(self):
        return self.peer_addr.ip.decode() if self.sock >= 0 else None

    def session(self):
        """The active session's record (see _loop.pyi), or None."""
        if self.sock < 0:
            return None
        cdef Traffic d = traffic_since(&self.c.t, &self.cur.base)
        return _session_dict(&self.cur, &d)

    def ended_session(self):
        """The record of the last session that ended (see _loop.pyi), or None."""
        if not self.has_last:
            return None
        out = _session_dict(&self.last, &self.last.base)
        out["ended"] = self.last.ended
        out["reason"] = self.last.reason.decode("utf-8", "replace")
        return out

    def stats(self):
        out = loop_stats(&self.tun, &self.c, _DROP_NAMES)
        out.update({
            "probation": int(self.prob_fd >= 0),
            "pending_handshakes": pending_count(self.pend, MAX_PENDING),
            "rx_buffered": self.rx_len,
            "tx_queued": self.tx_end - self.tx_off,
            "tun_queued": self.fq.bytes,
        })
        return out

    def _set_test_random(self, data):
        """Test hook: the next handshakes take their 32 random bytes from data."""
        set_test_random(&self.trand, data)

    def _set_test_random_failure(self, bint fail):
        """Test hook: the system's random source fails (EIO) while fail is True."""
        self.trand.fail = fail

    def _set_test_clock(self, t):
        """Test hook: fixed wall-clock seconds for the handshake timestamp and its check."""
        self.has_tclock = t is not None
        self.tclock = 0 if t is None else t

    def _set_test_queue(self, size_t ring, int32_t pkts, size_t limit):
        """Test hook: a flow queue of other sizes (before the session: packets queued are lost)."""
        cdef uint32_t seed = self.fq.seed
        dsvpn_fq_destroy(&self.fq)
        if dsvpn_fq_init(&self.fq, ring, pkts, limit, seed) != 0:
            raise MemoryError()

    def _test_fq_push(self, data, size_t room=0):
        """Test hook: queue data in the flow queue as a tun read of up to room bytes (default:
        its length) would; False if the queue has no place for such a read."""
        cdef const uint8_t[:] d = bytes(data)
        cdef size_t n = d.shape[0]
        cdef ptrdiff_t slot = dsvpn_fq_slot(&self.fq, room if room > n else n)
        if slot < 0:
            return False
        if n:
            memcpy(self.fq.ring + slot, &d[0], n)
        dsvpn_fq_commit(&self.fq, <size_t> slot, n, NULL, 0)
        return True

    def _test_fq_pop(self):
        """Test hook: the next packet the flow queue gives out, or None."""
        cdef int32_t pi = dsvpn_fq_dequeue(&self.fq)
        if pi < 0:
            return None
        cdef size_t off = self.fq.pkts[pi].off
        out = (<char*> self.fq.ring)[off:off + self.fq.pkts[pi].len]
        dsvpn_fq_release(&self.fq, pi)
        return out

    def _set_test_rx_queue_us(self, us=None):
        """Test hook: the receive budget's allowance for our own reading (None: the default)."""
        self.rxw.queue_us = RXW_QUEUE_US if us is None else us

    def _set_test_refuse_uso(self, bint refuse):
        """Test hook: UDP GSO writes to the tun fail as on a kernel without USO (EINVAL)."""
        self.tun.gro.test_refuse_uso = refuse

    def _set_test_timeouts(self, accept_ms=None, connect_ms=None, send_ms=None):
        """Test hook: shorten the handshake and send deadlines (None restores the default)."""
        self.accept_timeout_ms = ACCEPT_TIMEOUT_MS if accept_ms is None else accept_ms
        self.connect_timeout_ms = TIMEOUT_MS if connect_ms is None else connect_ms
        self.send_timeout_ms = TIMEOUT_MS if send_ms is None else send_ms


cdef dict _session_dict(SessionRec* s, const Traffic* t):
    return {
        "endpoint": s.endpoint.decode("utf-8", "replace"),
        "since": s.since,
        "latest_handshake": s.latest_handshake,
        "pfs": bool(s.pfs),
        "rx_bytes": t.rx_bytes,
        "tx_bytes": t.tx_bytes,
        "rx_packets": t.rx_packets,
        "tx_packets": t.tx_packets,
        "drops": {name: t.drops[i] for i, name in _DROP_NAMES.items()},
    }
