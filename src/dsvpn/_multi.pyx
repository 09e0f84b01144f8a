# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The data plane of a server of several clients (a peers file, dsvpn.peers): one nogil loop,
one tun, one session per peer, each peer with a key and a tunnel address of its own.

The wire is the reference's (docs/protocol.md): a client cannot tell this server from a server
of one client. A server of one client (a plain key file) runs _loop.Loop instead, unchanged.

Handshakes: the client's first packet names no peer, so each peer's keyed handshake state
(prepared once, when the peers are set) is tried on it until one authenticates it (about five
Xoodoo permutations per peer tried). A verified hello whose random value the same peer already
used within the timestamp window is refused (a replay); one that passes is answered, and its
connection becomes the peer's session at once when the peer has none. When the peer has one,
the new connection is on probation: it replaces the live session only once its first frame
authenticates (a replayed hello cannot get that far), or when the live session ends first; it is
closed if no frame has authenticated within the handshake deadline (ACCEPT_TIMEOUT_MS).

Forward-secret hellos (docs/protocol.md, Extensions): 72 bytes that no peer's KX authenticates
may be the start of an extended hello, so 32 more are read (same deadline) and each peer's PX
state (also prepared when the peers are set) is tried on all 104; the extended path thus costs
about twice the base one per peer. A match is checked (window, replay) as a base hello, then
handed to Python (EV_PFS_HELLO, take_pfs_hello()), which does the X25519 part and gives the
reply and the session key back (pfs_reply()); the session then starts as a base one does.
With require_pfs, a base hello is identified and then refused.

Packets: a tun packet goes to the session of the peer that owns its destination (the peer's
IPv4 address or its 64:ff9b:: twin), found in O(1) through a table indexed by the host part of
the pool's address. A frame from a peer whose packet is not from that peer's own address is
dropped (spoofed; an IPv6 packet for the peer's own link is dropped as link_local, admit.pxd).
Each session has its own flow queue and send batch (sendq.pxd, as _loop's one session): a
session's packets wait in its flow queue, framed a small batch at a time once its socket has
taken the last, so that a peer's ping does not wait behind its own download; and its socket's
receive buffer is kept to what its path needs (rxbudget.pxd). A session whose flow queue is
full takes no more packets (they are dropped and counted) while the others flow; only when
every session is full does the loop stop reading the tun, which is the backpressure of _loop.
Per turn each ready socket gets one read and one send, and the tun a bounded batch, so one
busy peer cannot starve another. Readiness comes from poller.h (epoll on Linux). Deadlines
(handshakes, stalled sends) are checked at least once a second, never per packet.
"""

cimport cython
from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset, strerror
from posix.unistd cimport close

from dsvpn._loop cimport (
    ACCEPT_TIMEOUT_MS,
    DROP_BAD_TAG,
    DROP_CONGESTION,
    DROP_NO_SESSION,
    DROP_OVERSIZE,
    EV_CONTROL,
    EV_HANDOFF,
    EV_LOG,
    EV_PFS_HELLO,
    EV_SESSION_DOWN,
    EV_SESSION_UP,
    EV_TUN_ERROR,
    EV_WAKE,
    TIMEOUT_MS,
    Event,
)
from dsvpn.admit cimport admit_source
from dsvpn.charm cimport (
    CHARM_HASH_LEN,
    CHARM_IV_LEN,
    CHARM_KEY_LEN,
    charm_hash,
    charm_init,
    charm_state,
)
from dsvpn.counters cimport Counters, Traffic, loop_stats
from dsvpn.events cimport EVQ_MAX, MSG_LEN, Events, events_next, events_push
from dsvpn.flowq cimport (DSVPN_FQ_HDR_MAX, dsvpn_fq, dsvpn_fq_commit, dsvpn_fq_destroy,
                          dsvpn_fq_init, dsvpn_fq_room, dsvpn_fq_slot)
from dsvpn.frame cimport frame_len, frame_open, rx_consume
from dsvpn.hello cimport (TestRandom, check_reply, hello_ts, hello_verifies, set_test_random,
                          take_random, ts_in_window)
from dsvpn.loop_sys cimport (
    DSVPN_IO_AGAIN,
    dsvpn_accept,
    dsvpn_addr,
    dsvpn_drain,
    dsvpn_now_ms,
    dsvpn_peer,
    dsvpn_random,
    dsvpn_read,
    dsvpn_send,
    dsvpn_set_nonblock,
    dsvpn_tcp_opts,
    dsvpn_wall_s,
)
from dsvpn.loop_text cimport (BAD_HELLO_FMT, HS_FAILED_FMT, KX_IV, NO_RANDOM, PFS_IV,
                              PROB_TIMEOUT_MSG, TOO_MANY_FMT)
from dsvpn.poller cimport (
    DSVPN_PERR,
    DSVPN_PIN,
    DSVPN_POUT,
    dsvpn_pev,
    dsvpn_poller,
    dsvpn_poller_add,
    dsvpn_poller_del,
    dsvpn_poller_free,
    dsvpn_poller_mod,
    dsvpn_poller_new,
    dsvpn_poller_wait,
)
from dsvpn.pending cimport (PEND_BASE, PEND_EXTENDED, PEND_READY, Pending, lost_fmt, pending_count,
                            pending_read, pending_ready, pending_slot, pending_start, pending_taken,
                            take_hello, unmatched)
from dsvpn.rxbudget cimport RXW_QUEUE_US, RxBudget, rx_budget_due, rx_budget_set, rx_budget_start
from dsvpn.sendq cimport QUICK_MAX, TX_CAP, Framer, bulk_ack, send_batch
from dsvpn.tun_io cimport (TUN_READ_MAX, TUN_SHORT, Tun, tun_error, tun_hdr_len, tun_read,
                           tun_setup, tun_write)
from dsvpn.tun_steer cimport dsvpn_steer_queue, dsvpn_tun_steer
from dsvpn.tun_vnet cimport dsvpn_gro_flush
from dsvpn.wire cimport *  # the protocol's sizes (docs/protocol.md)

from dsvpn._loop import Drop
from dsvpn._loop import Event as PyEvent

cdef enum:
    # Each session's flow queue: its storage, most packets, and the queued bytes at which it
    # takes no more (a bulk flow's backlog; what a sparse flow waits behind is a batch).
    SESS_FQ_RING = 2097152
    SESS_FQ_PKTS = 2048
    SESS_FQ_LIMIT = 1048576
    SCRATCH_CAP = TUN_READ_MAX + 16
    RX_READ = 65536             # one recv(): decrypted and written before anything else runs
    RX_CAP = RX_READ + FRAME_HDR_LEN + MAX_PAYLOAD + 16
    TUN_BUDGET = 256            # tun packets per turn
    ACCEPT_BUDGET = 16          # accept() calls per turn
    MAX_PENDING = 64            # concurrent handshakes; the oldest is dropped
    MAX_EVENTS = 256            # readiness reports per wait
    NAME_CAP = 33               # dsvpn.peers: names of at most 32 characters
    REPLAY_SLOTS = 8            # accepted hellos remembered per peer
    REPLAY_BYTES = 16           # of each one's random value
    CHECK_MS = 1000             # deadlines are looked at least this often
    MAX_PEERS = 1 << 20

# What a readiness report is about: kind | index << 8 | generation << 32.
cdef enum Kind:
    K_WAKE = 1
    K_CONTROL = 2
    K_LISTEN = 3
    K_TUN = 4
    K_PEND = 5
    K_SESS = 6

cdef const char* CLASSIC_REFUSED_FMT = b"classic handshake from %s refused (--require-pfs): peer %s"
cdef uint8_t NAT64[12]  # the 64:ff9b::/96 prefix of the peers' IPv6 twins

NAT64[:] = [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0]

_DROP_NAMES = {int(d): d.name.removeprefix("DROP_").lower() for d in Drop}


cdef struct Peer:
    charm_state kx              # its key's handshake state (docs/protocol.md, Handshake)
    charm_state px              # and its forward-secret one (Extensions)
    uint8_t ip4[4]
    uint8_t ip6[16]
    uint32_t host               # its address minus the pool's
    int live, prob              # its session, and a connection on probation (-1: none)
    uint8_t seen[REPLAY_SLOTS][REPLAY_BYTES]
    int64_t seen_ts[REPLAY_SLOTS]   # their timestamps (0: free slot)
    int seen_next
    char name[NAME_CAP]


cdef struct Sess:
    int fd                      # -1: a free slot
    int peer
    uint32_t gen                # bumped when the slot is freed: stale reports are ignored
    bint probation, want_out, blocked, dirty
    bint quick                  # its only waiting packet may go out at once (_flush_dirty)
    bint room                   # its socket reported room in this turn (_flush_dirty)
    int64_t prob_deadline       # probation: its first frame must authenticate by then
    charm_state tx_st, rx_st
    dsvpn_addr addr
    dsvpn_fq fq                 # its tun packets waiting to be framed (sendq.pxd)
    uint8_t* txbuf              # the batch being sent
    size_t tx_off, tx_end
    int64_t tx_since            # last send progress (or start of the wait)
    uint8_t* rxbuf
    size_t rx_len
    RxBudget rxw                # its socket's receive buffer (rxbudget.pxd)
    Traffic t
    int64_t since, latest_handshake
    bint pfs                    # keyed by the forward-secret handshake


cdef struct Handoff:
    # A session authenticated here for a peer another worker owns (take_handoffs)
    int fd
    int peer
    bint pfs
    uint8_t key[CHARM_HASH_LEN]


cdef inline uint64_t tag_of(Kind kind, uint32_t index, uint32_t gen) noexcept nogil:
    return <uint64_t> kind | (<uint64_t> index << 8) | (<uint64_t> gen << 32)


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t> p[0] << 24) | (<uint32_t> p[1] << 16) | (<uint32_t> p[2] << 8) | p[3]


cdef inline size_t unsent(const Sess* s) noexcept nogil:
    return s.tx_end - s.tx_off


cdef inline bint waiting(const Sess* s) noexcept nogil:
    """Something waits to be sent: a batch, or packets in the flow queue."""
    return s.tx_end > s.tx_off or s.fq.packets > 0


cdef inline void _free_buffers(Sess* s) noexcept nogil:
    """What a session slot holds only while its connection is open (_new_slot)."""
    free(s.txbuf)
    free(s.rxbuf)
    s.txbuf = s.rxbuf = NULL
    s.tx_off = s.tx_end = s.rx_len = 0
    dsvpn_fq_destroy(&s.fq)  # (nothing to free after a failed init: it zeroes the queue)


cdef str _ipv4_text(const uint8_t* a):
    return f"{a[0]}.{a[1]}.{a[2]}.{a[3]}"


def steer(int tun_fd, pool, int workers):
    """Make the kernel give each worker's tun queue the packets of the peers it owns (a
    multi-queue tun, tun_steer.h); OSError if it cannot (e.g. no eBPF)."""
    import ipaddress

    cdef uint32_t net = <uint32_t> int(ipaddress.IPv4Network(pool).network_address)
    cdef int err
    if workers < 1:
        raise ValueError("at least one worker")
    err = dsvpn_tun_steer(tun_fd, net, <uint32_t> workers)
    if err != 0:
        raise OSError(err, strerror(err).decode())


def owner(address, pool, int workers):
    """The worker that serves the peer of this tunnel address (as the kernel steers)."""
    import ipaddress

    return dsvpn_steer_queue(<uint32_t> int(ipaddress.IPv4Address(address)),
                             <uint32_t> int(ipaddress.IPv4Network(pool).network_address),
                             <uint32_t> workers)


@cython.final
cdef class MultiLoop:
    cdef Tun tun                    # the tun, its header and counters (tun_io.pxd)
    cdef int wake_fd, control_fd, listen_fd, mark
    cdef size_t mtu
    cdef bint closed, tun_on, require_pfs
    cdef dsvpn_poller* poller
    cdef dsvpn_pev* pevs
    # the pool: route[address - net] is a peer's index + 1 (0: none)
    cdef uint32_t net, size
    cdef uint32_t* route
    cdef Peer* peers
    cdef int npeers
    # session slots (allocated once each, kept for reuse)
    cdef Sess** sess
    cdef int* dirty             # sessions given packets in the current tun batch
    cdef int ndirty, cap, nlive, nblocked, guess
    cdef uint8_t* scratch       # a tun packet read with no session's flow queue at hand
    cdef uint32_t fq_seed       # flow hashing (any value works)
    cdef int64_t rxw_queue_us   # the receive budgets' allowance (rxbudget.pxd)
    cdef Pending pend[MAX_PENDING]
    cdef uint64_t pend_seq
    # workers (dsvpn.workers): this loop's index, how many there are; sessions of peers this
    # one does not own wait in hand until take_handoffs()
    cdef uint32_t worker, nworkers
    cdef Handoff hand[MAX_PENDING]
    cdef int nhand
    cdef int64_t now, next_check
    # test hooks
    cdef TestRandom trand
    cdef bint has_tclock
    cdef int64_t tclock
    cdef int64_t accept_timeout_ms, send_timeout_ms
    cdef Counters c
    cdef Events ev

    def __cinit__(self):
        cdef int i
        self.ev.cap = EVQ_MAX
        self.tun.fd = self.wake_fd = self.control_fd = self.listen_fd = -1
        for i in range(MAX_PENDING):
            self.pend[i].fd = -1
        self.guess = -1

    def __init__(self, int tun_fd, *, int listen_fd, pool, int wake_fd=-1, int control_fd=-1,
                 int mtu=9000, bint vnet_hdr=False, bint tun_header=False, int af_inet=2,
                 int af_inet6=10, int mark=0, bint require_pfs=False, int worker=0,
                 int workers=1):
        import ipaddress

        net = ipaddress.IPv4Network(pool)
        if not 16 <= net.prefixlen <= 30:
            raise ValueError(f"the pool must be a /16 to a /30, not {pool}")
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} of {workers}")
        tun_setup(&self.tun, mtu, tun_header, af_inet, af_inet6, vnet_hdr)
        self.worker, self.nworkers = <uint32_t> worker, <uint32_t> workers
        self.net = int(net.network_address)
        self.size = net.num_addresses
        self.mtu = <size_t> mtu
        self.mark = mark
        self.require_pfs = require_pfs
        self.accept_timeout_ms = ACCEPT_TIMEOUT_MS
        self.send_timeout_ms = TIMEOUT_MS
        self.route = <uint32_t*> calloc(self.size, sizeof(uint32_t))
        self.scratch = <uint8_t*> malloc(SCRATCH_CAP)
        dsvpn_random(<uint8_t*> &self.fq_seed, sizeof(self.fq_seed))
        self.rxw_queue_us = RXW_QUEUE_US
        self.pevs = <dsvpn_pev*> calloc(MAX_EVENTS, sizeof(dsvpn_pev))
        self.poller = dsvpn_poller_new(MAX_EVENTS)
        if (self.route == NULL or self.scratch == NULL
                or self.pevs == NULL or self.poller == NULL):
            raise MemoryError()
        if not self._grow(16):
            raise MemoryError()
        # The loop drains the tun until EAGAIN, so its reads must not block.
        # (listen_fd -1: a worker that only serves the sessions handed to it)
        if dsvpn_set_nonblock(tun_fd) != 0 or (listen_fd >= 0
                                               and dsvpn_set_nonblock(listen_fd) != 0):
            raise OSError(errno, strerror(errno).decode())
        self._watch(tun_fd, DSVPN_PIN, tag_of(K_TUN, 0, 0))
        if listen_fd >= 0:
            self._watch(listen_fd, DSVPN_PIN, tag_of(K_LISTEN, 0, 0))
        if wake_fd >= 0:
            self._watch(wake_fd, DSVPN_PIN, tag_of(K_WAKE, 0, 0))
        if control_fd >= 0:
            self._watch(control_fd, DSVPN_PIN, tag_of(K_CONTROL, 0, 0))
        self.tun.fd, self.listen_fd = tun_fd, listen_fd
        self.wake_fd, self.control_fd = wake_fd, control_fd
        self.tun_on = True

    cdef int _watch(self, int fd, uint32_t events, uint64_t tag) except -1:
        if dsvpn_poller_add(self.poller, fd, events, tag) != 0:
            raise OSError(errno, f"cannot watch descriptor {fd}: {strerror(errno).decode()}")
        return 0

    def __dealloc__(self):
        cdef int i
        self._close_all(b"loop closed", False)
        self._drop_handoffs()
        if self.sess != NULL:
            for i in range(self.cap):
                free(self.sess[i])
        free(self.sess)
        free(self.dirty)
        if self.peers != NULL:
            memset(self.peers, 0, <size_t> self.npeers * sizeof(Peer))
        free(self.peers)
        free(self.route)
        free(self.scratch)
        free(self.pevs)
        free(self.trand.buf)
        dsvpn_poller_free(self.poller)

    # ---------------------------------------------------------------- helpers

    cdef void _push(self, Event code, const char* msg) noexcept nogil:
        events_push(&self.ev, code, msg)

    cdef int _random(self, uint8_t* out, size_t n) noexcept nogil:
        return take_random(&self.trand, out, n)

    cdef int64_t _wall(self) noexcept nogil:
        return self.tclock if self.has_tclock else dsvpn_wall_s()

    cdef void _soon(self, int64_t deadline) noexcept nogil:
        if deadline < self.next_check:
            self.next_check = deadline

    cdef bint _grow(self, int want) noexcept nogil:
        """Room for `want` session slots."""
        cdef int cap = self.cap if self.cap else 16
        cdef Sess** sess
        cdef int* dirty
        cdef int i
        while cap < want:
            cap *= 2
        if cap == self.cap:
            return True
        sess = <Sess**> realloc(self.sess, <size_t> cap * sizeof(Sess*))
        if sess == NULL:
            return False
        self.sess = sess
        for i in range(self.cap, cap):
            sess[i] = NULL
        dirty = <int*> realloc(self.dirty, <size_t> cap * sizeof(int))
        if dirty == NULL:
            return False
        self.dirty = dirty
        self.cap = cap
        return True

    cdef int _new_slot(self) noexcept nogil:
        """A free session slot with its buffers, or -1 (out of memory)."""
        cdef int i, slot = -1
        cdef Sess* s
        for i in range(self.cap):
            if self.sess[i] == NULL or self.sess[i].fd < 0:
                slot = i
                break
        if slot < 0:
            slot = self.cap
            if not self._grow(self.cap + 1):
                return -1
        s = self.sess[slot]
        if s == NULL:
            s = <Sess*> calloc(1, sizeof(Sess))
            if s == NULL:
                return -1
            s.fd = -1
            self.sess[slot] = s
        s.txbuf = <uint8_t*> malloc(TX_CAP)
        s.rxbuf = <uint8_t*> malloc(RX_CAP)
        if s.txbuf == NULL or s.rxbuf == NULL or \
                dsvpn_fq_init(&s.fq, SESS_FQ_RING, SESS_FQ_PKTS, SESS_FQ_LIMIT, self.fq_seed) != 0:
            _free_buffers(s)
            return -1
        return slot

    # ---------------------------------------------------------------- sessions

    cdef void _end(self, int idx, const char* why, bint report) noexcept nogil:
        """Close session idx. A live one is reported (EV_SESSION_DOWN "<name> <why>") when
        report is set; a connection on probation is logged. When a live session ends, the
        peer's connection on probation takes its place."""
        cdef Sess* s = self.sess[idx]
        cdef Peer* p = &self.peers[s.peer]
        cdef char msg[MSG_LEN]
        cdef int heir
        if s.fd < 0:
            return
        dsvpn_poller_del(self.poller, s.fd)
        close(s.fd)
        s.fd = -1
        s.gen += 1
        s.dirty = s.room = s.quick = False
        if s.blocked:
            self.nblocked -= 1
            s.blocked = False
        if self.guess == idx:
            self.guess = -1
        memset(&s.tx_st, 0, sizeof(charm_state))
        memset(&s.rx_st, 0, sizeof(charm_state))
        # Merged packets waiting for the tun may point into its buffer: write them first.
        dsvpn_gro_flush(self.tun.fd, &self.tun.gro)
        _free_buffers(s)
        if s.probation:
            p.prob = -1
            self.c.probation_closed += 1
            snprintf(msg, MSG_LEN, "peer %s: new connection from %s closed before it replaced "
                     "the session: %s", p.name, s.addr.ip, why)
            self._push(EV_LOG, msg)
            return
        p.live = -1
        self.nlive -= 1
        if report:
            snprintf(msg, MSG_LEN, "%s %s", p.name, why)
            self._push(EV_SESSION_DOWN, msg)
        heir = p.prob
        if heir >= 0:
            self._promote(heir)

    cdef void _promote(self, int idx) noexcept nogil:
        """The connection on probation idx becomes its peer's session; the live one, if any,
        ends (replaced)."""
        cdef Sess* s = self.sess[idx]
        cdef Peer* p = &self.peers[s.peer]
        cdef char why[MSG_LEN]
        p.prob = -1  # first, so that ending the old session does not promote it again
        if p.live >= 0:
            snprintf(why, MSG_LEN, "replaced by a new connection from %s", s.addr.ip)
            self._end(p.live, why, True)
        s.probation = False
        s.since = dsvpn_wall_s()
        p.live = idx
        self.nlive += 1
        self._session_up(s, p)

    cdef void _session_up(self, Sess* s, Peer* p) noexcept nogil:
        cdef char msg[MSG_LEN]
        snprintf(msg, MSG_LEN, "%s %s", p.name, s.addr.ip)
        self._push(EV_SESSION_UP, msg)

    cdef void _start(self, int idx, int fd, int peer, const uint8_t* key,
                     const dsvpn_addr* addr, bint pfs) noexcept nogil:
        """The handshake on fd authenticated peer and gave session key key: key the session
        (docs/protocol.md, Direction states) and make it the peer's, or put it on probation
        while the peer has a live session."""
        cdef Sess* s = self.sess[idx]
        cdef Peer* p = &self.peers[peer]
        cdef uint8_t iv[CHARM_IV_LEN]
        cdef char msg[MSG_LEN]
        memset(iv, 0, CHARM_IV_LEN)
        iv[0] = 1  # the server sends with IV[0] = 1, the client with 0
        charm_init(&s.tx_st, key, iv)
        iv[0] = 0
        charm_init(&s.rx_st, key, iv)
        s.fd = fd
        s.peer = peer
        s.pfs = pfs
        s.addr = addr[0]
        s.tx_off = s.tx_end = s.rx_len = 0
        s.want_out = s.blocked = s.dirty = s.room = s.quick = False
        memset(&s.t, 0, sizeof(Traffic))
        rx_budget_start(&s.rxw, dsvpn_now_ms(), 0)
        s.rxw.queue_us = self.rxw_queue_us
        s.since = s.latest_handshake = dsvpn_wall_s()
        dsvpn_poller_mod(self.poller, fd, DSVPN_PIN, tag_of(K_SESS, <uint32_t> idx, s.gen))
        self.c.handshakes_ok += 1
        if pfs:
            self.c.handshakes_pfs += 1
        if p.live < 0:
            s.probation = False
            p.live = idx
            self.nlive += 1
            self._session_up(s, p)
            return
        if p.prob >= 0:
            self._end(p.prob, b"a newer connection completed its handshake", False)
        s.probation = True
        s.prob_deadline = dsvpn_now_ms() + self.accept_timeout_ms
        self._soon(s.prob_deadline)
        p.prob = idx
        snprintf(msg, MSG_LEN, "peer %s: new connection from %s; it replaces the session from "
                 "%s once its first frame authenticates", p.name, addr.ip,
                 self.sess[p.live].addr.ip)
        self._push(EV_LOG, msg)

    cdef void _end_errno(self, int idx, const char* fmt, int err) noexcept nogil:
        cdef char msg[MSG_LEN]
        snprintf(msg, MSG_LEN, fmt, strerror(err))
        self._end(idx, msg, True)

    cdef void _close_all(self, const char* why, bint report) noexcept nogil:
        cdef int i
        if self.poller == NULL:
            return  # __init__ failed: nothing was opened
        for i in range(MAX_PENDING):
            self._drop_pending(i)
        if self.sess == NULL:
            return
        for i in range(self.cap):
            if self.sess[i] != NULL and self.sess[i].fd >= 0 and self.sess[i].probation:
                self._end(i, why, False)
        for i in range(self.cap):
            if self.sess[i] != NULL and self.sess[i].fd >= 0:
                self._end(i, why, report)

    # ---------------------------------------------------------------- handshakes

    cdef void _drop_pending(self, int i) noexcept nogil:
        if self.pend[i].fd >= 0:
            dsvpn_poller_del(self.poller, self.pend[i].fd)  # (fails harmlessly once ready)
            close(self.pend[i].fd)
            self.pend[i].fd = -1
            self.pend[i].gen += 1
        self.pend[i].stage = PEND_BASE
        memset(&self.pend[i].st, 0, sizeof(charm_state))

    cdef void _pending_fail(self, int i, const char* fmt, const char* arg) noexcept nogil:
        cdef char msg[MSG_LEN]
        snprintf(msg, MSG_LEN, fmt, self.pend[i].addr.ip, arg)
        self._drop_pending(i)
        self.c.handshakes_failed += 1
        self._push(EV_LOG, msg)

    cdef void _accept(self) noexcept nogil:
        cdef int _n, fd, i
        cdef bint full
        cdef dsvpn_addr addr
        cdef Pending* p
        for _n in range(ACCEPT_BUDGET):
            fd = dsvpn_accept(self.listen_fd, &addr)
            if fd < 0:
                return  # EAGAIN, or a transient error (ECONNABORTED, EMFILE): retried later
            dsvpn_tcp_opts(fd, self.mark, TIMEOUT_MS, NOTSENT_LOWAT)
            i = pending_slot(self.pend, MAX_PENDING, &full)
            if full:
                self._pending_fail(i, TOO_MANY_FMT, b"")
            p = &self.pend[i]
            if dsvpn_poller_add(self.poller, fd, DSVPN_PIN,
                                tag_of(K_PEND, <uint32_t> i, p.gen)) != 0:
                close(fd)
                continue
            self.pend_seq += 1
            pending_start(p, fd, &addr, self.pend_seq, self.now + self.accept_timeout_ms)
            self._soon(p.deadline)

    cdef void _pending_io(self, int i) noexcept nogil:
        """Read the hello: once its 72 bytes are in, answer it if a peer's KX authenticates
        it; otherwise read 32 more and try it as an extended hello. Never more than the hello:
        what follows belongs to the session."""
        cdef Pending* p = &self.pend[i]
        if p.stage == PEND_BASE:
            if not self._pending_read(i, PKT1_LEN):
                return
            if self._hello(i):
                return
            p.stage = PEND_EXTENDED
        if p.stage == PEND_EXTENDED and self._pending_read(i, PFS_HELLO_LEN):
            self._pfs_hello(i)

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

    cdef int _identify(self, const uint8_t* hello, charm_state* st, bint pfs) noexcept nogil:
        """The peer whose key authenticates the hello, base or extended (pfs), or -1; st: its
        state after the hello's first 40 bytes, or its transcript state after h1. Every peer's
        KX (PX) is tried: about five permutations each (twice that for PX)."""
        cdef size_t n = PKT1_LEN if pfs else HS_RANDOM_LEN + HS_TIMESTAMP_LEN
        cdef int k
        for k in range(self.npeers):
            st[0] = self.peers[k].px if pfs else self.peers[k].kx
            if hello_verifies(st, hello, n):
                return k
        memset(st, 0, sizeof(charm_state))
        return -1

    cdef int64_t _stamp(self, const uint8_t* hello) noexcept nogil:
        """The hello's timestamp, or -1 when it is outside the window."""
        cdef int64_t ts = hello_ts(hello)
        if ts < 0 or not ts_in_window(ts - self._wall()):
            return -1
        return ts

    cdef bint _replayed(self, Peer* p, const uint8_t* hello, int64_t ts) noexcept nogil:
        """Whether the peer already used this hello's random value within the window; if
        not, remember it (over the oldest remembered one)."""
        cdef int j, slot = p.seen_next
        cdef int64_t now = self._wall()
        for j in range(REPLAY_SLOTS):
            if p.seen_ts[j] != 0 and memcmp(p.seen[j], hello, REPLAY_BYTES) == 0:
                # Its timestamp passed the window check; the remembered one is the same.
                return True
        for j in range(REPLAY_SLOTS):
            # An expired entry (its hello would fail the window check now) is free.
            if p.seen_ts[j] == 0 or now - p.seen_ts[j] > TS_TOLERANCE_S:
                slot = j
                break
        memcpy(p.seen[slot], hello, REPLAY_BYTES)
        p.seen_ts[slot] = ts if ts > 0 else 1
        if slot == p.seen_next:
            p.seen_next = (p.seen_next + 1) % REPLAY_SLOTS
        return False

    cdef bint _fresh(self, int i, int peer) noexcept nogil:
        """Whether the authenticated hello of pending handshake i is within the window and not
        a replay of peer's; if not, the handshake fails (logged)."""
        cdef Pending* p = &self.pend[i]
        cdef int64_t ts = self._stamp(p.buf)
        if ts < 0:
            self._pending_fail(i, b"clock difference too large from %s%s", b"")
            return False
        if self._replayed(&self.peers[peer], p.buf, ts):
            self.c.replays += 1
            self._pending_fail(i, b"replayed handshake from %s refused (peer %s)",
                               self.peers[peer].name)
            return False
        return True

    cdef int _claim_slot(self, int i) noexcept nogil:
        """A session slot for pending handshake i, or -1 (the handshake failed, logged)."""
        cdef int idx = self._new_slot()
        if idx < 0:
            self._pending_fail(i, HS_FAILED_FMT, b"out of memory")
        return idx

    cdef bint _reply(self, int i, int idx, const uint8_t* msg, size_t n) noexcept nogil:
        """Send the reply to pending handshake i in one non-blocking write (a fresh socket
        always has room for it); if that fails, free session slot idx (if any: -1) and fail
        i."""
        if dsvpn_send(self.pend[i].fd, msg, n) == <ssize_t> n:
            return True
        if idx >= 0:
            _free_buffers(self.sess[idx])
        self._pending_fail(i, HS_FAILED_FMT, b"could not send the reply")
        return False

    cdef int _detach(self, int i) noexcept nogil:
        """Pending handshake i is complete: its socket, which becomes a session's."""
        cdef Pending* p = &self.pend[i]
        cdef int fd = p.fd
        p.fd = -1
        p.gen += 1
        p.stage = PEND_BASE
        memset(&p.st, 0, sizeof(charm_state))
        return fd

    cdef bint _hello(self, int i) noexcept nogil:
        """The 72 bytes of pending handshake i as a base hello: False if no peer's KX
        authenticates them (perhaps an extended hello), else True, answered or failed."""
        cdef Pending* p = &self.pend[i]
        cdef charm_state st
        cdef uint8_t pkt2[PKT2_LEN]
        cdef uint8_t k[CHARM_HASH_LEN]
        cdef char why[MSG_LEN]
        cdef int peer, err
        peer = self._identify(p.buf, &st, False)
        if peer < 0:
            return False
        if self.require_pfs:
            memset(&st, 0, sizeof(charm_state))
            self._pending_fail(i, CLASSIC_REFUSED_FMT, self.peers[peer].name)
            return True
        if not self._fresh(i, peer):
            memset(&st, 0, sizeof(charm_state))
            return True
        err = self._random(pkt2, HS_RANDOM_LEN)
        if err != 0:
            memset(&st, 0, sizeof(charm_state))
            snprintf(why, MSG_LEN, "%s: %s", NO_RANDOM, strerror(err))
            self._pending_fail(i, HS_FAILED_FMT, why)
            return True
        charm_hash(&st, pkt2, HS_RANDOM_LEN, pkt2 + HS_RANDOM_LEN)
        charm_hash(&st, NULL, 0, k)  # the session key (docs/protocol.md, Handshake)
        memset(&st, 0, sizeof(charm_state))
        self._complete(i, peer, k, pkt2, PKT2_LEN, False)
        memset(k, 0, CHARM_HASH_LEN)
        return True

    cdef bint _complete(self, int i, int peer, const uint8_t* key, const uint8_t* reply,
                        size_t n, bint pfs) noexcept nogil:
        """Send pending handshake i its reply and start the session keyed with key: here, or
        in the worker that owns the peer (handed over). False if it failed (logged)."""
        cdef Handoff* h
        cdef int idx, fd
        if self._owner(peer) != self.worker:
            if self.nhand == MAX_PENDING:
                self._pending_fail(i, HS_FAILED_FMT, b"too many sessions wait for their worker")
                return False
            if not self._reply(i, -1, reply, n):
                return False
            fd = self._detach(i)
            dsvpn_poller_del(self.poller, fd)
            h = &self.hand[self.nhand]
            self.nhand += 1
            h.fd, h.peer, h.pfs = fd, peer, pfs
            memcpy(h.key, key, CHARM_HASH_LEN)
            self._push(EV_HANDOFF, b"")
            return True
        idx = self._claim_slot(i)
        if idx < 0 or not self._reply(i, idx, reply, n):
            return False
        fd = self._detach(i)
        self._start(idx, fd, peer, key, &self.pend[i].addr, pfs)
        return True

    cdef inline uint32_t _owner(self, int peer) noexcept nogil:
        """The worker whose tun queue the kernel gives the peer's packets (tun_steer.h)."""
        return dsvpn_steer_queue(self.peers[peer].host, 0, self.nworkers)

    cdef void _drop_handoffs(self) noexcept nogil:
        cdef int i
        for i in range(self.nhand):
            close(self.hand[i].fd)
        memset(self.hand, 0, sizeof(self.hand))
        self.nhand = 0

    cdef void _pfs_hello(self, int i) noexcept nogil:
        """The 104 bytes of pending handshake i as an extended hello: once a peer's PX
        authenticates it and it is fresh, it waits for Python (EV_PFS_HELLO)."""
        cdef Pending* p = &self.pend[i]
        cdef char who[MSG_LEN]
        cdef int peer = self._identify(p.buf, &p.st, True)
        if peer < 0:
            self._pending_fail(i, BAD_HELLO_FMT, b"")
            return
        if not self._fresh(i, peer):
            return  # (_pending_fail wiped p.st)
        p.peer = peer
        p.stage = PEND_READY
        # Nothing more to read until it is answered: not watched meanwhile, so that a client
        # that closes cannot make every wait return at once (its deadline still holds).
        dsvpn_poller_del(self.poller, p.fd)
        snprintf(who, MSG_LEN, "%s", p.addr.ip)
        self._push(EV_PFS_HELLO, who)

    # ---------------------------------------------------------------- session -> tun

    cdef void _sess_read(self, int idx) noexcept nogil:
        cdef Sess* s = self.sess[idx]
        cdef ssize_t n = dsvpn_read(s.fd, s.rxbuf + s.rx_len, RX_CAP - s.rx_len)
        cdef ssize_t used
        if n == DSVPN_IO_AGAIN:
            return
        if n == 0:
            self._end(idx, b"connection closed by peer", True)
            return
        if n < 0:
            self._end_errno(idx, b"read error: %s", errno)
            return
        s.t.rx_bytes += <uint64_t> n
        self.c.t.rx_bytes += <uint64_t> n
        s.rx_len += <size_t> n
        if rx_budget_due(&s.rxw, self.now):
            rx_budget_set(&s.rxw, s.fd, self.now, s.t.rx_bytes)
        used = self._frames(idx)
        if used < 0:
            return
        # Merged packets point into rxbuf: write them before it is compacted.
        dsvpn_gro_flush(self.tun.fd, &self.tun.gro)
        rx_consume(s.rxbuf, &s.rx_len, <size_t> used)

    cdef ssize_t _frames(self, int idx) noexcept nogil:
        """Decrypt and deliver every complete frame of session idx. Returns the bytes used, or
        -1 if a bad tag ended the session."""
        cdef Sess* s = self.sess[idx]
        cdef size_t pos = 0, plen
        cdef uint8_t* f
        cdef int drop
        while s.rx_len - pos >= FRAME_HDR_LEN:
            f = s.rxbuf + pos
            plen = frame_len(f)
            if s.rx_len - pos < FRAME_HDR_LEN + plen:
                break
            if frame_open(&s.rx_st, f, plen) != 0:
                # Frames before this one were already written to the tun, as in the reference.
                dsvpn_gro_flush(self.tun.fd, &self.tun.gro)
                s.t.drops[<int> DROP_BAD_TAG] += 1
                self.c.t.drops[<int> DROP_BAD_TAG] += 1
                self._end(idx, b"corrupted stream", True)
                return -1
            s.t.rx_packets += 1
            self.c.t.rx_packets += 1
            if s.probation:
                # Its first frame authenticated: a replayed hello could not have done that.
                self._promote(idx)
            if plen > 0:
                drop = self._admit(&self.peers[s.peer], f + FRAME_HDR_LEN, plen)
                if drop < 0:
                    tun_write(&self.tun, f, plen)
                else:
                    s.t.drops[drop] += 1
                    self.c.t.drops[drop] += 1
            pos += FRAME_HDR_LEN + plen
        return <ssize_t> pos

    cdef inline int _admit(self, const Peer* p, const uint8_t* pkt, size_t plen) noexcept nogil:
        """-1 if the decrypted packet may go to the tun (an IP packet from the peer's own
        address), else the Drop reason."""
        if plen > self.mtu:
            return DROP_OVERSIZE
        return admit_source(pkt, plen, p.ip4, p.ip6)

    # ---------------------------------------------------------------- tun -> sessions

    cdef int _route(self, const uint8_t* pkt, size_t n) noexcept nogil:
        """The live session of the peer that owns the packet's destination, or -1."""
        cdef uint32_t dst, host, k
        cdef int version = pkt[0] >> 4
        if version == 4 and n >= 20:
            dst = be32(pkt + 16)
        elif version == 6 and n >= 40 and memcmp(pkt + 24, NAT64, 12) == 0:
            dst = be32(pkt + 36)
        else:
            return -1
        host = dst - self.net
        if host >= self.size:
            return -1
        k = self.route[host]
        if k == 0:
            return -1
        return self.peers[k - 1].live

    cdef void _tun_stop(self, ssize_t n) noexcept nogil:
        """A tun read returned n <= 0: nothing more to read, or a fatal error (event)."""
        cdef const char* why = tun_error(n)
        if why != NULL:
            self._push(EV_TUN_ERROR, why)

    cdef void _drop(self, Sess* s, int why) noexcept nogil:
        s.t.drops[why] += 1
        self.c.t.drops[why] += 1

    cdef void _room(self, Sess* s) noexcept nogil:
        """Whether s's flow queue takes one more tun read; it is full (blocked) if not."""
        cdef bint full = not dsvpn_fq_room(&s.fq, TUN_READ_MAX)
        if full != s.blocked:
            s.blocked = full
            self.nblocked += 1 if full else -1

    cdef Sess* _guess(self) noexcept nogil:
        """The session the last packet went to, if the next one can be read straight into
        its flow queue (a bulk flow's next packet mostly goes there too)."""
        cdef Sess* g
        if self.guess < 0:
            return NULL
        g = self.sess[self.guess]
        if g.fd < 0 or g.probation or g.blocked:
            return NULL
        return g

    cdef void _tun_batch(self) noexcept nogil:
        """Read up to TUN_BUDGET tun packets, each into its session's flow queue, then start
        sending in each session that got some."""
        cdef int count = 0, dst
        cdef ssize_t n, slot = -1
        cdef size_t plen, hoff = tun_hdr_len(&self.tun)
        cdef uint8_t hdr[DSVPN_FQ_HDR_MAX]
        cdef uint8_t* p
        cdef Sess* s
        cdef Sess* g
        while count < TUN_BUDGET:
            if self.nlive > 0 and self.nblocked == self.nlive:
                break  # every session is full: the packets wait in the tun's queue
            g = self._guess()
            p = self.scratch
            if g != NULL:
                slot = dsvpn_fq_slot(&g.fq, TUN_READ_MAX)
                p = g.fq.ring + slot
            n = tun_read(&self.tun, hdr, p)
            count += 1
            if n == TUN_SHORT:
                continue
            if n <= 0:
                self._tun_stop(n)
                break
            plen = <size_t> n
            dst = self._route(p, plen)
            if dst < 0:
                self.c.t.drops[<int> DROP_NO_SESSION] += 1
                continue
            s = self.sess[dst]
            if s != g:
                slot = dsvpn_fq_slot(&s.fq, plen)
                if slot < 0:
                    self._drop(s, DROP_CONGESTION)  # its queue is full: the others flow
                    continue
                memcpy(s.fq.ring + slot, p, plen)
            if not waiting(s):
                s.tx_since = self.now  # the send deadline counts from here
                # Latency: a lone small packet (ping, DNS, a keystroke, a request) need not
                # wait one more turn for room in the socket. Pure ACKs and large ones do.
                s.quick = plen <= QUICK_MAX and not bulk_ack(s.fq.ring + slot, plen)
            else:
                s.quick = False
            dsvpn_fq_commit(&s.fq, <size_t> slot, plen, hdr, hoff)
            self._room(s)
            self._mark(dst)
            self.guess = dst

    cdef void _mark(self, int idx) noexcept nogil:
        """Session idx has something to send, or room to send it: _flush_dirty sees to it."""
        cdef Sess* s = self.sess[idx]
        if not s.dirty and self.ndirty < self.cap:  # (a slot ended and reused in one turn)
            s.dirty = True
            self.dirty[self.ndirty] = idx
            self.ndirty += 1

    cdef void _flush_dirty(self) noexcept nogil:
        cdef int i, idx
        cdef Sess* s
        for i in range(self.ndirty):
            idx = self.dirty[i]
            s = self.sess[idx]
            if s.fd >= 0 and s.dirty:
                s.dirty = False
                # As _loop: a new batch once the socket has room (POLLOUT), so that what
                # waits in it in FIFO order stays one batch beyond TCP_NOTSENT_LOWAT.
                if s.room:
                    self._flush(idx)
                elif s.quick and s.fq.packets == 1 and unsent(s) == 0:
                    self._tx_batch(idx)
                else:
                    self._want_out(idx)
                s.quick = s.room = False
        self.ndirty = 0

    cdef void _tx_batch(self, int idx) noexcept nogil:
        """Frame a batch from session idx's flow queue into its empty buffer and send it."""
        cdef Sess* s = self.sess[idx]
        cdef Framer fr
        if s.fq.packets > 0 and unsent(s) == 0:
            fr.st, fr.tun, fr.t, fr.total = &s.tx_st, &self.tun, &s.t, &self.c.t
            fr.congestion = NULL
            fr.oversize, fr.congested = DROP_OVERSIZE, DROP_CONGESTION
            s.tx_off = s.tx_end = 0
            send_batch(&fr, &s.fq, s.txbuf, &s.tx_end)
            self._room(s)
            if not self._send(idx):
                return  # the session ended
        self._want_out(idx)

    cdef void _flush(self, int idx) noexcept nogil:
        """Session idx's socket has room: the rest of its batch, or the next one."""
        if not self._send(idx):
            return
        if unsent(self.sess[idx]) == 0:
            self._tx_batch(idx)
        else:
            self._want_out(idx)

    cdef bint _send(self, int idx) noexcept nogil:
        """Send what session idx's batch has left, as far as its socket takes it. False if
        that ended the session."""
        cdef Sess* s = self.sess[idx]
        cdef ssize_t n
        if unsent(s) == 0:
            return True
        n = dsvpn_send(s.fd, s.txbuf + s.tx_off, unsent(s))
        if n > 0:
            s.tx_off += <size_t> n
            s.t.tx_bytes += <uint64_t> n
            self.c.t.tx_bytes += <uint64_t> n
            s.tx_since = self.now
            if s.tx_off == s.tx_end:
                s.tx_off = s.tx_end = 0
        elif n != DSVPN_IO_AGAIN:
            self._end_errno(idx, b"write error: %s", errno if n < 0 else 0)
            return False
        return True

    cdef void _want_out(self, int idx) noexcept nogil:
        """Watch session idx's socket for room while anything waits to be sent."""
        cdef Sess* s = self.sess[idx]
        cdef bint want = waiting(s)
        if want:
            self._soon(s.tx_since + self.send_timeout_ms)
        if want != s.want_out:
            s.want_out = want
            dsvpn_poller_mod(self.poller, s.fd, DSVPN_PIN | (DSVPN_POUT if want else 0),
                             tag_of(K_SESS, <uint32_t> idx, s.gen))

    # ---------------------------------------------------------------- the loop

    cdef void _deadlines(self) noexcept nogil:
        cdef int i
        cdef int64_t now = self.now
        cdef Sess* s
        self.next_check = now + CHECK_MS
        for i in range(MAX_PENDING):
            if self.pend[i].fd >= 0:
                if now < self.pend[i].deadline:
                    self._soon(self.pend[i].deadline)
                elif unmatched(&self.pend[i]):
                    self._pending_lost(i, b"handshake timeout")
                else:
                    self._pending_fail(i, b"handshake timeout from %s%s", b"")
        for i in range(self.cap):
            s = self.sess[i]
            if s == NULL or s.fd < 0:
                continue
            if s.probation:
                if now >= s.prob_deadline:
                    self._end(i, PROB_TIMEOUT_MSG, False)
                    continue
                self._soon(s.prob_deadline)
            if not waiting(s):
                continue
            if now - s.tx_since >= self.send_timeout_ms:
                self._end(i, b"send timeout", True)
            else:
                self._soon(s.tx_since + self.send_timeout_ms)

    cdef void _tun_interest(self) noexcept nogil:
        """Watch the tun unless every session is full (then its queue holds the packets). Not
        watched at all meanwhile: an error report would otherwise wake every wait."""
        cdef bint want = not (self.nlive > 0 and self.nblocked == self.nlive)
        if want == self.tun_on:
            return
        if want:
            self.tun_on = dsvpn_poller_add(self.poller, self.tun.fd, DSVPN_PIN,
                                           tag_of(K_TUN, 0, 0)) == 0
        elif dsvpn_poller_del(self.poller, self.tun.fd) == 0:
            self.tun_on = False

    cdef void _drain_wake(self) noexcept nogil:
        dsvpn_drain(self.wake_fd)
        self._push(EV_WAKE, b"")

    cdef void _dispatch(self, int n) noexcept nogil:
        """Serve the readiness reports of one wait: sockets' reads first, then the tun, so
        that what a write to the tun answers at once is read in the same turn; then the
        sockets with room, so that a batch is framed from what the tun has just given (a
        sparse flow's packet then goes in this batch, not the next)."""
        cdef int i, idx
        cdef uint64_t tag
        cdef uint32_t ev, gen
        cdef Kind kind
        cdef bint tun = False
        cdef uint64_t wrote = self.tun.tx_packets
        cdef Sess* s
        for i in range(n):
            tag = self.pevs[i].data
            ev = self.pevs[i].events
            kind = <Kind> (tag & 0xff)
            idx = <int> ((tag >> 8) & 0xffffff)
            gen = <uint32_t> (tag >> 32)
            if kind == K_SESS:
                s = self.sess[idx]
                if s.fd < 0 or s.gen != gen:
                    continue  # ended (and perhaps reused) since the wait
                if ev & (DSVPN_PIN | DSVPN_PERR):
                    self._sess_read(idx)
                if s.fd >= 0 and s.gen == gen and (ev & DSVPN_POUT):
                    s.room = True
                    self._mark(idx)
            elif kind == K_PEND:
                if self.pend[idx].fd >= 0 and self.pend[idx].gen == gen:
                    self._pending_io(idx)
            elif kind == K_TUN:
                tun = True
            elif kind == K_LISTEN:
                self._accept()
            elif kind == K_WAKE:
                self._drain_wake()
            elif kind == K_CONTROL:
                self._push(EV_CONTROL, b"")  # left unread: Python answers it
        if self.tun_on and (tun or self.tun.tx_packets != wrote):
            self._tun_batch()
        self._flush_dirty()

    cdef void _run(self, int64_t timeout_ms) noexcept nogil:
        cdef int n, err, wait
        cdef int64_t end, nxt
        self.now = dsvpn_now_ms()
        end = self.now + timeout_ms if timeout_ms >= 0 else -1
        if self.next_check == 0:
            self.next_check = self.now
        while True:
            if self.now >= self.next_check:
                self._deadlines()
            if self.ev.count:
                return
            self._tun_interest()
            nxt = self.next_check
            if end >= 0 and end < nxt:
                nxt = end
            wait = <int> (nxt - self.now) if nxt > self.now else 0
            n = dsvpn_poller_wait(self.poller, self.pevs, wait)
            err = errno
            self.now = dsvpn_now_ms()
            if n < 0 and err == EINTR and self.wake_fd < 0:
                self._push(EV_WAKE, b"")  # nobody else will tell Python about the signal
                return
            if n > 0:
                self._dispatch(n)
            if self.ev.count or (end >= 0 and self.now >= end):
                return

    # ---------------------------------------------------------------- Python API

    def set_peers(self, peers):
        """Serve exactly these peers from now on; see _multi.pyi."""
        import ipaddress

        from dsvpn.config import tun_ip6

        cdef list wanted = list(peers)
        cdef int n = len(wanted), k, j, old
        cdef Peer* fresh
        cdef Peer* q
        cdef const uint8_t[:] key
        cdef bytes name_b, a6
        cdef uint32_t host
        cdef list ended = []
        if n > MAX_PEERS:
            raise ValueError(f"at most {MAX_PEERS} peers")
        names, hosts = set(), set()
        checked = []
        for name, raw_key, address in wanted:
            name_b = str(name).encode()
            if not 0 < len(name_b) < NAME_CAP or b" " in name_b or name in names:
                raise ValueError(f"invalid or duplicate peer name {name!r}")
            key = bytes(raw_key)
            if key.shape[0] != CHARM_KEY_LEN:
                raise ValueError(f"the key of {name} must be exactly {CHARM_KEY_LEN} bytes")
            offset = int(ipaddress.IPv4Address(address)) - self.net
            if not 0 < offset < self.size - 1 or offset in hosts:
                raise ValueError(f"address {address} of {name} is taken or not in the pool")
            host = <uint32_t> offset
            names.add(name)
            hosts.add(host)
            checked.append((name_b, bytes(raw_key), host,
                            ipaddress.IPv6Address(tun_ip6(str(address))).packed))
        fresh = <Peer*> calloc(n if n > 0 else 1, sizeof(Peer))
        if fresh == NULL:
            raise MemoryError()
        # old index -> new index (-1: removed or changed)
        remap = [-1] * self.npeers
        by_name = {self.peers[j].name.decode(): j for j in range(self.npeers)}
        for k, (name_b, raw, host, a6) in enumerate(checked):
            q = &fresh[k]
            key = raw
            charm_init(&q.kx, &key[0], <const uint8_t*> KX_IV)
            charm_init(&q.px, &key[0], <const uint8_t*> PFS_IV)
            q.host = host
            for j in range(4):
                q.ip4[j] = <uint8_t> ((self.net + host) >> (24 - 8 * j))
            memcpy(q.ip6, <const char*> a6, 16)
            snprintf(q.name, NAME_CAP, "%s", <const char*> name_b)
            q.live = q.prob = -1
            old = by_name.get(name_b.decode(), -1)
            if (old >= 0 and memcmp(&self.peers[old].kx, &q.kx, sizeof(charm_state)) == 0
                    and self.peers[old].host == host):
                # The same peer: its sessions and remembered hellos carry over.
                remap[old] = k
                q.live, q.prob = self.peers[old].live, self.peers[old].prob
                memcpy(q.seen, self.peers[old].seen, sizeof(q.seen))
                memcpy(q.seen_ts, self.peers[old].seen_ts, sizeof(q.seen_ts))
                q.seen_next = self.peers[old].seen_next
        # End the sessions of peers that are gone or changed, under the old table.
        for old in range(self.npeers):
            if remap[old] >= 0:
                continue
            if self.peers[old].prob >= 0:
                self._end(self.peers[old].prob, b"its peer was removed", False)
            if self.peers[old].live >= 0:
                ended.append(self.peers[old].name.decode())
                self.peers[old].prob = -1
                self._end(self.peers[old].live, b"removed from the peers file", True)
        for k in range(self.cap):
            if self.sess[k] != NULL and self.sess[k].fd >= 0:
                self.sess[k].peer = remap[self.sess[k].peer]
        for k in range(MAX_PENDING):
            # An extended hello waiting for its reply belongs to its peer too.
            if self.pend[k].fd >= 0 and self.pend[k].stage >= PEND_READY:
                if remap[self.pend[k].peer] < 0:
                    self._pending_fail(k, HS_FAILED_FMT, b"its peer was removed")
                else:
                    self.pend[k].peer = remap[self.pend[k].peer]
        memset(self.route, 0, self.size * sizeof(uint32_t))
        for k in range(n):
            self.route[fresh[k].host] = <uint32_t> (k + 1)
        if self.peers != NULL:
            memset(self.peers, 0, <size_t> self.npeers * sizeof(Peer))
            free(self.peers)
        self.peers = fresh
        self.npeers = n
        return ended

    def run(self, int timeout_ms):
        """Run until the first event or timeout_ms (negative: no timeout); see _multi.pyi."""
        if self.closed:
            raise RuntimeError("loop is closed")
        if self.ev.count == 0:
            with nogil:
                self._run(timeout_ms)
        return events_next(&self.ev, PyEvent)

    def disconnect(self, name=None):
        """End the session (and connection on probation) of peer name, or every session and
        handshake; no event is reported. False if that peer has no session."""
        cdef int k
        if name is None:
            self._close_all(b"disconnected locally", False)
            return True
        for k in range(self.npeers):
            if self.peers[k].name.decode() == name:
                if self.peers[k].prob >= 0:
                    self._end(self.peers[k].prob, b"disconnected locally", False)
                if self.peers[k].live >= 0:
                    self._end(self.peers[k].live, b"disconnected locally", False)
                    return True
        return False

    def close(self):
        """Close every socket the loop owns. The loop cannot be used afterwards."""
        self._close_all(b"loop closed", False)
        self.closed = True

    def sessions(self):
        """The live sessions by peer name (see _multi.pyi)."""
        cdef int k
        cdef Sess* s
        out = {}
        for k in range(self.npeers):
            if self.peers[k].live < 0:
                continue
            s = self.sess[self.peers[k].live]
            out[self.peers[k].name.decode()] = {
                "endpoint": s.addr.endpoint.decode("utf-8", "replace"),
                "address": _ipv4_text(self.peers[k].ip4),
                "since": s.since,
                "latest_handshake": s.latest_handshake,
                "rx_bytes": s.t.rx_bytes,
                "tx_bytes": s.t.tx_bytes,
                "rx_packets": s.t.rx_packets,
                "tx_packets": s.t.tx_packets,
                "drops": {name: s.t.drops[i] for i, name in _DROP_NAMES.items()},
                "replacement": (self.sess[self.peers[k].prob].addr.endpoint.decode()
                                if self.peers[k].prob >= 0 else None),
                "pfs": bool(s.pfs),
            }
        return out

    def stats(self):
        out = {
            "peers": self.npeers,
            "sessions": self.nlive,
            "sessions_full": self.nblocked,
            "probation": sum(1 for i in range(self.npeers) if self.peers[i].prob >= 0),
        }
        out.update(loop_stats(&self.tun, &self.c, _DROP_NAMES))
        out["replays"] = self.c.replays
        out["pending_handshakes"] = pending_count(self.pend, MAX_PENDING)
        return out

    def take_pfs_hello(self):
        """The next verified extended hello waiting for its reply, or None; see _multi.pyi."""
        cdef int i = pending_ready(self.pend, MAX_PENDING)
        if i < 0:
            return None
        p = &self.pend[i]
        return take_hello(p, f"{p.addr.ip.decode()}, peer {self.peers[p.peer].name.decode()}")

    def pfs_reply(self, uint64_t token, reply, key):
        """Send the extended reply of the hello take_pfs_hello() returned with token, and
        start the peer's session with session key key; see _multi.pyi."""
        cdef const uint8_t[:] r = reply
        cdef const uint8_t[:] k = key
        cdef int i
        cdef Pending* p
        check_reply(r.shape[0], k.shape[0])
        i = pending_taken(self.pend, MAX_PENDING, token)
        if i < 0:
            return False
        p = &self.pend[i]
        # Watched again, as a pending handshake, until _start makes it a session.
        if dsvpn_poller_add(self.poller, p.fd, DSVPN_PIN,
                            tag_of(K_PEND, <uint32_t> i, p.gen)) != 0:
            self._pending_fail(i, HS_FAILED_FMT, strerror(errno))
            return False
        return self._complete(i, p.peer, &k[0], &r[0], PFS_REPLY_LEN, True)

    def pfs_abort(self, uint64_t token, str why):
        """Close that handshake's connection without a reply and log why; see _multi.pyi."""
        cdef int i = pending_taken(self.pend, MAX_PENDING, token)
        cdef bytes w = why.encode("utf-8", "replace")
        if i >= 0:
            self._pending_fail(i, HS_FAILED_FMT, w)
        return i >= 0

    def take_handoffs(self):
        """The sessions authenticated here for peers other workers own; see _multi.pyi."""
        cdef int i
        cdef Handoff* h
        out = []
        for i in range(self.nhand):
            h = &self.hand[i]
            key = bytearray(h.key[:CHARM_HASH_LEN])
            out.append((self._owner(h.peer), h.fd, self.peers[h.peer].name.decode(), key,
                        bool(h.pfs)))
        memset(self.hand, 0, sizeof(self.hand))  # the fds are the caller's now
        self.nhand = 0
        return out

    def adopt(self, int fd, str name, key, bint pfs=False):
        """Start peer name's session on fd, whose handshake another worker completed with
        session key key; see _multi.pyi."""
        cdef const uint8_t[:] k = key
        cdef int peer = -1, j, idx
        cdef dsvpn_addr addr
        cdef char msg[MSG_LEN]
        cdef bytes name_b = name.encode()
        cdef const char* why = NULL
        if k.shape[0] != CHARM_KEY_LEN:
            raise ValueError(f"the key must be {CHARM_KEY_LEN} bytes")
        for j in range(self.npeers):
            if self.peers[j].name == name_b:
                peer = j
                break
        if peer < 0 or self._owner(peer) != self.worker:
            why = b"its peer was removed or moved meanwhile"
        elif dsvpn_peer(fd, &addr) != 0:
            why = b"the connection was lost"
        if why == NULL:
            idx = self._new_slot()
            if idx < 0:
                why = b"out of memory"
            elif dsvpn_poller_add(self.poller, fd, DSVPN_PIN,
                                  tag_of(K_SESS, <uint32_t> idx, self.sess[idx].gen)) != 0:
                _free_buffers(self.sess[idx])
                why = strerror(errno)
        if why != NULL:
            close(fd)
            self.c.handshakes_failed += 1
            snprintf(msg, MSG_LEN, "peer %s: session closed before it started: %s",
                     <const char*> name_b, <const char*> why)
            self._push(EV_LOG, msg)
            return False
        self._start(idx, fd, peer, &k[0], &addr, pfs)  # (non-blocking since its accept)
        return True

    def _set_test_random(self, data):
        """Test hook: the next handshakes take their 32 random bytes from data."""
        set_test_random(&self.trand, data)

    def _set_test_clock(self, t):
        """Test hook: fixed wall-clock seconds for the handshake timestamp check."""
        self.has_tclock = t is not None
        self.tclock = 0 if t is None else t

    def _set_test_timeouts(self, accept_ms=None, send_ms=None):
        """Test hook: shorten the handshake and send deadlines (None restores the default)."""
        self.accept_timeout_ms = ACCEPT_TIMEOUT_MS if accept_ms is None else accept_ms
        self.send_timeout_ms = TIMEOUT_MS if send_ms is None else send_ms
        self.next_check = 0
