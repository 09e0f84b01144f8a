# Server handshakes in progress (docs/protocol.md, Handshake and Extensions), for both loops:
# accepted connections whose hello is arriving, in a table of MAX_PENDING slots (fd -1: free).
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport strerror

from dsvpn.charm cimport charm_state
from dsvpn.hello cimport state_bytes
from dsvpn.loop_sys cimport DSVPN_IO_AGAIN, dsvpn_addr, dsvpn_read
from dsvpn.loop_text cimport BAD_HELLO_FMT, HS_FAILED_FMT
from dsvpn.wire cimport HS_RANDOM_LEN, HS_TIMESTAMP_LEN, PFS_HELLO_LEN, PKT1_LEN, X25519_LEN


cdef enum Stage:
    PEND_BASE = 0               # reading the first 72 bytes (a classic hello, or not yet known)
    PEND_EXTENDED = 1           # not a classic hello: reading the extended hello's last 32
    PEND_READY = 2              # extended hello verified: for take_pfs_hello()
    PEND_TAKEN = 3              # Python is computing the reply (pfs_reply(), pfs_abort())


cdef struct Pending:
    int fd
    int got
    Stage stage
    int peer                    # MultiLoop, PEND_READY and PEND_TAKEN: whose key verified it
    uint32_t gen                # MultiLoop: bumped when the slot is freed (stale reports)
    int64_t deadline
    uint64_t seq                # also the token of take_pfs_hello()
    charm_state st              # PEND_READY: the transcript state after h1
    uint8_t buf[PFS_HELLO_LEN]
    dsvpn_addr addr


cdef inline bint pending_read(Pending* p, int upto, const char** lost) noexcept nogil:
    """Read what has arrived of p's hello, up to byte upto; True once there. Never past it:
    after a classic hello, the next bytes belong to the frame stream. lost: set to what
    happened when the connection ended (closed, an error) before that."""
    cdef ssize_t n
    if p.got >= upto:
        return True
    n = dsvpn_read(p.fd, p.buf + p.got, <size_t> (upto - p.got))
    if n == DSVPN_IO_AGAIN:
        return False
    if n == 0:
        lost[0] = b"connection closed"
        return False
    if n < 0:
        lost[0] = strerror(errno)
        return False
    p.got += <int> n
    return p.got == upto


cdef inline bint unmatched(const Pending* p) noexcept nogil:
    """p ended with 72 bytes that no key verifies as a classic hello and nothing more: most
    likely a classic client whose key is not ours."""
    return p.stage == PEND_EXTENDED and p.got == PKT1_LEN


cdef inline const char* lost_fmt(const Pending* p, const char** arg) noexcept nogil:
    """The log format (%s: the client's IP, then arg) of p lost before its hello was whole:
    unmatched (arg becomes ""), or a failed handshake (arg: what happened)."""
    if unmatched(p):
        arg[0] = b""
        return BAD_HELLO_FMT
    return HS_FAILED_FMT


cdef inline int pending_slot(const Pending* pend, int n, bint* full) noexcept nogil:
    """A free slot of pend[0..n); when all are taken (full), the oldest handshake's, which the
    caller drops, so that a flood cannot exhaust our descriptors."""
    cdef int i, slot = 0
    full[0] = False
    for i in range(n):
        if pend[i].fd < 0:
            return i
    for i in range(1, n):
        if pend[i].seq < pend[slot].seq:
            slot = i
    full[0] = True
    return slot


cdef inline void pending_start(Pending* p, int fd, const dsvpn_addr* addr, uint64_t seq,
                               int64_t deadline) noexcept nogil:
    """Slot p takes the accepted connection fd: its hello is awaited until deadline."""
    p.fd = fd
    p.got = 0
    p.stage = PEND_BASE
    p.seq = seq
    p.deadline = deadline
    p.addr = addr[0]


cdef inline int pending_taken(const Pending* pend, int n, uint64_t token) noexcept nogil:
    """The handshake with this token that Python is answering, or -1."""
    cdef int i
    for i in range(n):
        if pend[i].fd >= 0 and pend[i].seq == token and pend[i].stage == PEND_TAKEN:
            return i
    return -1


cdef inline int pending_ready(const Pending* pend, int n) noexcept nogil:
    """A verified extended hello waiting for take_pfs_hello(), or -1."""
    cdef int i
    for i in range(n):
        if pend[i].fd >= 0 and pend[i].stage == PEND_READY:
            return i
    return -1


cdef inline tuple take_hello(Pending* p, str who):
    """What take_pfs_hello() returns of the verified extended hello p (see _loop.pyi), which
    then waits for Python's answer; its state is wiped here."""
    cdef int j = HS_RANDOM_LEN + HS_TIMESTAMP_LEN  # E_c
    p.stage = PEND_TAKEN
    return (p.seq, state_bytes(&p.st), bytes(p.buf[j:j + X25519_LEN]), who)


cdef inline int pending_count(const Pending* pend, int n) noexcept nogil:
    cdef int i, k = 0
    for i in range(n):
        if pend[i].fd >= 0:
            k += 1
    return k
